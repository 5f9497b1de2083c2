"""Loading: the explicit `from_pretrained`, the global `from_pretrained` hook, and `load` (base + adapter).

`enable()` makes every `PreTrainedModel.from_pretrained` (so every `AutoModel*.from_pretrained`) return the NF4 base
with LoRA injected, which is what lets an unmodified Trainer script train QLoRA with two added lines.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

from .config import LowRankConfig
from .inject import inject
from .quantize import bnb_config, current_device_map, for_launch, prepare_for_kbit_training

_local = threading.local()
_active: LowRankConfig | None = None
_original = None  # PreTrainedModel.from_pretrained's function while the hook is installed


def _bypass_depth() -> int:
    return getattr(_local, "depth", 0)


@contextlib.contextmanager
def _bypass():
    _local.depth = _bypass_depth() + 1
    try:
        yield
    finally:
        _local.depth -= 1


def from_pretrained(model_cls: Any, name_or_path: str, lowrank_config: LowRankConfig | None = None, /,
                    **hf_kwargs: Any):
    """Load `name_or_path` with `model_cls` (an `AutoModel*` or model class), quantize, prepare and inject LoRA.

    Arguments the caller gives in `hf_kwargs` win over ours (`quantization_config`, `dtype`, `device_map`);
    `config=` is transformers' model config, as in `from_pretrained`.
    """
    config = for_launch(lowrank_config or LowRankConfig())
    if config.quantization:
        hf_kwargs.setdefault("quantization_config", bnb_config(config))
        if "torch_dtype" not in hf_kwargs:
            hf_kwargs.setdefault("dtype", getattr(torch, config.compute_dtype))
        hf_kwargs.setdefault("device_map", current_device_map())
    with _bypass():
        model = model_cls.from_pretrained(name_or_path, **hf_kwargs)
    prepare_for_kbit_training(model)
    return inject(model, config)


def _hooked_from_pretrained(cls, *args: Any, **kwargs: Any):
    if _active is None or _bypass_depth() > 0:
        return _original(cls, *args, **kwargs)
    if len(args) != 1:
        raise TypeError("with hf_lowrank enabled, from_pretrained() takes the model name or path as its only "
                        "positional argument; pass the rest as keywords")
    return from_pretrained(cls, args[0], _active, **kwargs)


def enable(config: LowRankConfig | None = None, **fields: Any) -> LowRankConfig:
    """Install the hook: from now on `from_pretrained` gives a quantized base with LoRA; Trainers adapt to it.

    `enable(r=8, lora_alpha=16)` or `enable(LowRankConfig(...))`. Returns the config in force.
    """
    global _active, _original
    from transformers import PreTrainedModel

    from . import seams

    if config is not None and fields:
        raise TypeError("enable() takes a LowRankConfig or keyword fields, not both")
    config = config if config is not None else LowRankConfig(**fields)
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"enable() expects a LowRankConfig, got {type(config).__name__}")
    if _original is None:
        _original = PreTrainedModel.from_pretrained.__func__
        PreTrainedModel.from_pretrained = classmethod(_hooked_from_pretrained)
    _active = config
    seams.install(hooked=True)
    return config


def disable() -> None:
    """Remove the hook: `from_pretrained` is transformers' own again."""
    global _active, _original
    from . import seams

    if _original is not None:
        from transformers import PreTrainedModel

        PreTrainedModel.from_pretrained = classmethod(_original)
        _original = None
    _active = None
    seams.install(hooked=False)


def active_config() -> LowRankConfig | None:
    return _active


@contextlib.contextmanager
def enabled(config: LowRankConfig | None = None, **fields: Any):
    """`with hf_lowrank.enabled(r=8): model = AutoModelForCausalLM.from_pretrained(p)`; the previous state after."""
    previous = _active
    enable(config, **fields)
    try:
        yield _active
    finally:
        if previous is None:
            disable()
        else:
            enable(previous)


_FROM_ADAPTER = object()


def load(model_cls: Any, adapter: str, *, revision: str | None = None, quantization: Any = _FROM_ADAPTER,
         base: str | None = None, **hf_kwargs: Any):
    """The base model named in the adapter's config (at its recorded revision), then the adapter, strictly.

    `quantization` defaults to what hf_lowrank recorded when it saved the adapter, and to None (a 16-bit base)
    for adapters written by other tools. `base` overrides the recorded base path (a local copy, say).
    """
    from .state import read_adapter

    files = read_adapter(adapter, revision=revision)
    cfg = files.config
    if quantization is not _FROM_ADAPTER:
        cfg = cfg.replace(quantization=quantization)
    base = base or files.base_model
    if not base:
        raise ValueError(f"{files.config_path}: base_model_name_or_path is empty; pass base='path/or/repo-id'.")
    if files.base_revision and "revision" not in hf_kwargs and base == files.base_model:
        hf_kwargs["revision"] = files.base_revision
    check_base(base, hf_kwargs.get("revision"), files, given_as=f"base={base!r}",
               fix="pass base='path/or/hub-id' (the base model's folder or Hub id)",
               **{k: hf_kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in hf_kwargs})
    if cfg.quantization is None and "dtype" not in hf_kwargs and "torch_dtype" not in hf_kwargs:
        hf_kwargs["dtype"] = "auto"
    model = from_pretrained(model_cls, base, cfg, **hf_kwargs)
    from .state import load_adapter

    return load_adapter(model, files)


def check_base(base: str, revision: str | None, files: Any, *, given_as: str, fix: str, **hub: Any) -> None:
    """Fail at once, naming the base and the fix, when `base` is neither a folder here nor a repo the Hub serves
    (instead of `from_pretrained` retrying an unreachable Hub, or a traceback about a relative path)."""
    from .hub import source_problem
    from .state import AdapterError

    problem = source_problem(base, revision, **hub)
    if problem is not None:
        where = f"the base model {base!r} recorded in {files.config_path}" if base == files.base_model else given_as
        raise AdapterError(f"{where} {problem}; {fix}")
