"""The loading API: the explicit `from_pretrained`, `inject` and `load_adapter` on a model, and `load` (base + adapter).

    from_pretrained(AutoModelForCausalLM, path, cfg)   NF4 base (BitsAndBytesConfig from cfg, one device per rank)
                                                       → freeze, input grads → inject LoRA → attach
    load_adapter(model, folder_or_repo_id)             resolve (local folder, or pulled from the Hub) → strict load
    load(AutoModelForCausalLM, folder_or_repo_id)      the base the adapter records, then load_adapter

`attach` is what makes transformers treat an injected model as an adapter model, on the instance only: the
`_hf_peft_config_loaded` flag (which the Trainer's quantized-model gate and `gradient_checkpointing_enable` read)
and a `save_pretrained` that writes the adapter files (the flag alone would send transformers' own down a path that
imports peft). Class-level patches of transformers live in `hf_lowrank.integrations`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LowRankConfig
from .format import AdapterError
from .fused_lm import enable_fused_loss
from .inject import inject as _inject
from .inject import output_head, resolve_targets
from .launch import current_device_map, for_launch
from .quantize import bnb_config, prepare_for_kbit_training

_local = threading.local()


@contextlib.contextmanager
def bypassed():
    """Inside the block, the global `from_pretrained` hook (if installed) calls transformers' own."""
    _local.depth = bypass_depth() + 1
    try:
        yield
    finally:
        _local.depth -= 1


def bypass_depth() -> int:
    return getattr(_local, "depth", 0)


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
    with bypassed():
        model = model_cls.from_pretrained(name_or_path, **hf_kwargs)
    prepare_for_kbit_training(model)
    _inject_and_init(model, config, name_or_path, hf_kwargs)
    if config.fused_loss:
        enable_fused_loss(model)  # a no-op (the stock path) for anything but a supported causal LM
    return model


def _inject_and_init(model: nn.Module, config: LowRankConfig | None, name_or_path: str,
                     hf_kwargs: dict[str, Any]) -> None:
    """Inject and attach; with init="loftq", A and B from the 16-bit weights `name_or_path` holds (checked first:
    a bad source leaves the model as it was)."""
    if config is None or config.init != "loftq":
        _inject(model, config)
        attach(model)
        return
    from .loftq import loftq_init, loftq_plan

    plan = loftq_plan(model, _local_checkpoint(name_or_path, hf_kwargs), resolve_targets(model, config))
    _inject(model, config)
    attach(model)
    model.loftq_error_ratios = loftq_init(model, plan)


def _local_checkpoint(name_or_path: str, hf_kwargs: dict[str, Any]) -> Path:
    """The folder holding the checkpoint `from_pretrained` just read: the path itself, or its Hub cache snapshot."""
    if name_or_path and Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    fix = "load the model with hf_lowrank.from_pretrained(cls, path, LowRankConfig(init='loftq'))"
    if not name_or_path:
        raise ValueError(f"init='loftq' reads the 16-bit weights the model was loaded from, and this model does not "
                         f"say where that was (model.name_or_path is empty): {fix}")
    try:
        return Path(snapshot_download(name_or_path, revision=hf_kwargs.get("revision"), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except (LocalEntryNotFoundError, ValueError) as e:
        raise ValueError(f"init='loftq' reads the 16-bit weights the model was loaded from, and {name_or_path!r} is "
                         f"neither a local folder nor in the Hub cache ({type(e).__name__}): {fix}") from None


def inject(model: nn.Module, config: LowRankConfig | None = None) -> nn.Module:
    """Put LoRA layers into `model` (see `hf_lowrank.inject.inject`); a transformers model is also attached, so
    the Trainer and `save_pretrained` treat it as an adapter model. Returns the same model object."""
    _inject_and_init(model, config, getattr(model, "name_or_path", "") or "", {})  # LoftQ: the model's source
    return model


def attach(model: nn.Module) -> None:
    """Mark a transformers model with adapters as an adapter model, on the instance (a no-op for other modules)."""
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be a transformers model
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return
    model._hf_peft_config_loaded = True
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    head = output_head(model)
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        _HEADS[id(head.weight)] = head


#: the output heads of attached models, by id of the weight they show (what TRL's chunked head reads).
_HEADS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def our_head(weight: Any) -> nn.Module | None:
    """The output head of a model hf_lowrank attached whose `weight` is `weight`, else None."""
    head = _HEADS.get(id(weight))
    return head if head is not None and getattr(head, "weight", None) is weight else None


def _save_pretrained(self, save_directory, *, is_main_process: bool = True, state_dict=None, push_to_hub=False,
                     **kwargs):
    """Write the adapter (PEFT's files) instead of the full model; `state_dict` is used when given (what the
    Trainer's `_save` gathered under DeepSpeed / FSDP)."""
    from .state import save_adapter

    if not is_main_process:
        return
    save_adapter(self, save_directory, state_dict=state_dict)
    if push_to_hub:
        from .hub import push_adapter

        repo_id = kwargs.pop("repo_id", os.path.basename(os.fspath(save_directory).rstrip("/")))
        push_adapter(save_directory, repo_id, commit_message=kwargs.get("commit_message"),
                     token=kwargs.get("token"), private=kwargs.get("private", False))


def resolve_adapter(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local adapter folder as it is, or a Hub repo id ("user/name") pulled into the Hub cache."""
    path = Path(src)
    if path.is_dir():
        return path
    s = os.fspath(src)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not path.exists()
    if looks_like_repo and not os.path.exists(s.split("/")[0]):
        from .hub import pull_adapter

        return Path(pull_adapter(s, revision=revision))
    if path.exists():
        raise AdapterError(f"{path} is a file; an adapter is a folder with adapter_model.safetensors and "
                           "adapter_config.json")
    raise AdapterError(f"adapter folder {path} does not exist (nor is it a Hub repo id like 'user/name')")


def read(src, revision: str | None = None, *, describe_only: bool = False):
    """`hf_lowrank.state.read_adapter` of a local folder or a Hub repo id."""
    from .state import AdapterFiles, read_adapter

    if isinstance(src, AdapterFiles):
        return src
    return read_adapter(resolve_adapter(src, revision), describe_only=describe_only)


def load_adapter(model: nn.Module, src, revision: str | None = None) -> nn.Module:
    """Load an adapter (a folder, or a Hub repo id at `revision`) strictly into `model`, injecting layers first when
    it has none. Everything is checked before any parameter changes. Returns the model."""
    from .state import load_adapter as load_files

    load_files(model, read(src, revision))
    attach(model)
    return model


_FROM_ADAPTER = object()


def load(model_cls: Any, adapter, *, revision: str | None = None, quantization: Any = _FROM_ADAPTER,
         base: str | None = None, **hf_kwargs: Any):
    """The base model named in the adapter's config (at its recorded revision), then the adapter, strictly.

    `quantization` defaults to what hf_lowrank recorded when it saved the adapter, and to None (a 16-bit base)
    for adapters written by other tools. `base` overrides the recorded base path (a local copy, say); a base the
    adapter names is read from safetensors files only (`use_safetensors=True`, unless passed).
    """
    files = read(adapter, revision)
    cfg = files.config
    if quantization is not _FROM_ADAPTER:
        cfg = cfg.replace(quantization=quantization)
    named_by_adapter, base = not base, base or files.base_model
    if not base:
        raise AdapterError(f"{files.config_path}: base_model_name_or_path is empty; pass base='path/or/repo-id'.")
    if named_by_adapter:  # a stranger's choice, for a Hub adapter: its weights are never unpickled
        hf_kwargs.setdefault("use_safetensors", True)
    if files.base_revision and "revision" not in hf_kwargs and base == files.base_model:
        hf_kwargs["revision"] = files.base_revision
    check_base(base, hf_kwargs.get("revision"), files, given_as=f"base={base!r}",
               fix="pass base='path/or/hub-id' (the base model's folder or Hub id)",
               **{k: hf_kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in hf_kwargs})
    if cfg.quantization is None and "dtype" not in hf_kwargs and "torch_dtype" not in hf_kwargs:
        hf_kwargs["dtype"] = "auto"
    try:
        model = from_pretrained(model_cls, base, cfg, **hf_kwargs)
    except OSError as e:
        if named_by_adapter and hf_kwargs["use_safetensors"] and "safetensors" in str(e):
            raise AdapterError(f"the base model {base!r} recorded in {files.config_path} has no safetensors weights "
                               f"({e}); hf_lowrank does not unpickle a base an adapter names: pass base=... to "
                               "load one you trust") from None
        raise
    return load_adapter(model, files)


def check_base(base: str, revision: str | None, files: Any, *, given_as: str, fix: str, **hub: Any) -> None:
    """Fail at once, naming the base and the fix, when `base` is neither a folder here nor a repo the Hub serves
    (instead of `from_pretrained` retrying an unreachable Hub, or a traceback about a relative path)."""
    from .hub import source_problem

    problem = source_problem(base, revision, **hub)
    if problem is not None:
        where = f"the base model {base!r} recorded in {files.config_path}" if base == files.base_model else given_as
        raise AdapterError(f"{where} {problem}; {fix}")


def model_class(files):
    """The transformers Auto class for an adapter's task (causal LM when its config does not say)."""
    import transformers

    from .format import TASK_CLASSES

    return getattr(transformers, TASK_CLASSES.get(files.peft_config.get("task_type") or "", "AutoModelForCausalLM"))


#: what `resolve_base` downloads of a Hub base: the config, tokenizer files and the weights.
BASE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")


def resolve_base(files, base: str | None = None, allow_patterns: tuple[str, ...] = BASE_FILES) -> Path:
    """A local folder with the base's files: `base`, or the base the adapter records (downloaded from the Hub at its
    recorded revision when it is a repo id; `allow_patterns` limits what is downloaded, e.g. ("*.json",))."""
    name = base or files.base_model
    if not name:
        raise AdapterError(f"{files.config_path}: base_model_name_or_path is empty; pass --base PATH")
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    revision = files.base_revision if name == files.base_model else None
    return Path(snapshot_download(name, revision=revision, allow_patterns=list(allow_patterns)))
