"""Adapter files in PEFT's format: build, save atomically, read, check strictly, load.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r×in), ….lora_B.weight (out×r),
                                base_model.model.<module>.weight for modules_to_save; header metadata:
                                format=pt and hf_lowrank.* (version, base, revision, quantization, fingerprint,
                                adapted modules' shapes, xxh3 checksum of the tensors)
    adapter_config.json         PEFT's LoraConfig fields only (unknown keys make PEFT warn)
    README.md                   model card (written when the folder has none)

Safetensors only: nothing is ever unpickled. Saves are all or nothing (temporary folder, fsync, rename); loads check
everything (header, checksum, keys, shapes) before the first parameter changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import LowRankConfig
from .inject import AdapterModules, adapter_modules, inject, resolve_targets
from .layers import is_conv1d, layer_features

logger = logging.getLogger("hf_lowrank")

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
PREFIX = "base_model.model."
META = "hf_lowrank."
CHECKSUM = META + "checksum"
LEGACY_CRC32 = META + "crc32"  # the checksum key of adapters saved by earlier development versions


class AdapterError(ValueError):
    """An adapter file or folder that cannot be used as it is; the message names the file and the fix."""


# ---- building ---------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                       dtype: torch.dtype | None = None,
                       found: AdapterModules | None = None) -> dict[str, torch.Tensor]:
    """PEFT-format keys → tensors for the adapters and `modules_to_save` of `model`.

    With `state_dict` (what DeepSpeed / FSDP gathered for `Trainer._save`), tensors are taken from it, not from the
    possibly sharded parameters. `found`: the model's `adapter_modules`, when the caller has walked it already.
    """
    found = found or adapter_modules(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, param in found.parameters().items():
        t = state_dict[key] if state_dict is not None and key in state_dict else param
        t = t.detach()
        t = t.to("cpu", dtype or t.dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share storage (tied weights)
        seen.add(t.untyped_storage().data_ptr())
        out[PREFIX + key] = t
    return out


def _fingerprint(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def _target_shapes(found: AdapterModules) -> dict[str, list[int]]:
    """{module name: [out, in]} of every adapted layer: which base the adapter was trained on."""
    return {name: [layer.out_features, layer.in_features] for name, layer in found.layers}


TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
              "ForQuestionAnswering": "QUESTION_ANS", "Model": "FEATURE_EXTRACTION"}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type from the model class name (GPT2LMHeadModel → CAUSAL_LM; BertModel → FEATURE_EXTRACTION)."""
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


def peft_config_dict(model: nn.Module, found: AdapterModules | None = None) -> dict[str, Any]:
    cfg: LowRankConfig = model.lowrank_config
    found = found or adapter_modules(model)
    targets = cfg.target_modules
    if targets == "all-linear" or isinstance(targets, list):
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in found.layers})
    hf_config = getattr(model, "config", None)
    conv = any(is_conv1d(layer.base_layer) for _, layer in found.layers)
    return cfg.to_peft_dict(task_type=task_type(model),
                            base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
                            revision=getattr(hf_config, "_commit_hash", None) or None, fan_in_fan_out=conv,
                            target_modules=targets)


def adapter_metadata(model: nn.Module, found: AdapterModules | None = None) -> dict[str, str]:
    cfg: LowRankConfig = model.lowrank_config
    hf_config = getattr(model, "config", None)
    shapes = _target_shapes(found or adapter_modules(model))
    quant = {"quantization": cfg.quantization, "double_quant": cfg.double_quant, "compute_dtype": cfg.compute_dtype,
             "quant_storage": cfg.quant_storage} if cfg.quantization else {"quantization": None}
    return {
        "format": "pt",
        META + "version": __version__,
        META + "base_model": getattr(hf_config, "_name_or_path", "") or "",
        META + "base_revision": getattr(hf_config, "_commit_hash", None) or "",
        META + "base_architecture": ",".join(getattr(hf_config, "architectures", None) or [type(model).__name__]),
        META + "quantization": json.dumps(quant, sort_keys=True),
        META + "fingerprint": _fingerprint(shapes),
        META + "modules": json.dumps(shapes, sort_keys=True, separators=(",", ":")),
    }


# ---- writing ------------------------------------------------------------------------------------------------------


def _feed_tensors(tensors: dict[str, torch.Tensor], update: Callable[[bytes | memoryview], None]) -> None:
    """Every tensor's name, dtype, shape and bytes in key order, into a checksum's `update`."""
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()  # no copy for what save and load pass: contiguous CPU tensors
        update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        update((t if t.dim() else t.reshape(1)).view(torch.uint8).numpy())


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-64 over every tensor's name, dtype, shape and bytes in key order, as "xxh3_64:<hex>".

    Catches flipped or lost bits in the data, which safetensors' own header checks cannot see (accidental damage,
    not tampering). xxh3 hashes at memory speed: ~4× faster than zlib's CRC-32 here.
    """
    import xxhash

    h = xxhash.xxh3_64()
    _feed_tensors(tensors, h.update)
    return "xxh3_64:" + h.hexdigest()


def _legacy_crc32(tensors: dict[str, torch.Tensor]) -> str:
    """The CRC-32 that development versions before the switch to xxh3 recorded, over the same bytes."""
    import zlib

    crc = 0

    def update(data) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    _feed_tensors(tensors, update)
    return f"{crc:08x}"


def _checksum_matches(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """True when the header records no checksum (PEFT's files) or the one it records matches the tensors; files
    saved by development versions before the switch to xxh3 carry a CRC-32 (`hf_lowrank.crc32`), checked as such."""
    if CHECKSUM in metadata:
        return metadata[CHECKSUM] == tensor_checksum(tensors)
    if LEGACY_CRC32 in metadata:
        return metadata[LEGACY_CRC32] == _legacy_crc32(tensors)
    return True


def _write_flushed(path: Path, write: Callable[[str], None]) -> None:
    """`write(path)`, then flush the file to disk."""
    write(str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TEMP_PREFIX = ".hf_lowrank-save-"


def atomic_write_files(folder: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write every file into a private temporary folder inside `folder`, flush each, then rename each over its target.

    A crash while writing (the slow part) leaves the previous files untouched; only the renames, which take
    microseconds, run after the first target changes. What a killed save left behind (a `.hf_lowrank-save-*` folder)
    is removed by the next save; one writer per folder is assumed.
    """
    for stale in folder.glob(TEMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX))
    try:
        for name, write in writers.items():
            _write_flushed(tmp / name, write)
        for name in writers:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(folder)


def write_adapter_files(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        peft_config: dict[str, Any], training_summary: dict[str, Any] | None = None) -> Path:
    """Write PEFT-format adapter files (`tensors` keyed with the `base_model.model.` prefix) atomically."""
    from safetensors.torch import save_file

    from .card import model_card

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for key, t in tensors.items():
        if t.numel() == 0:
            raise AdapterError(
                f"refusing to save {key}: the tensor is empty (shape {tuple(t.shape)}). Under DeepSpeed ZeRO-3 or FSDP "
                "the parameters must be gathered first; save through Trainer.save_model or model.save_pretrained.")
    metadata = {**metadata, "format": "pt", CHECKSUM: tensor_checksum(tensors)}
    config_text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    writers: dict[str, Callable[[str], None]] = {
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata=metadata),
        CONFIG_NAME: lambda p: Path(p).write_text(config_text),
    }
    card = out / CARD_NAME
    if not card.exists() or "hf-lowrank" in card.read_text(errors="ignore")[:2000]:
        text = model_card(peft_config, metadata, training_summary)
        writers[CARD_NAME] = lambda p: Path(p).write_text(text)
    atomic_write_files(out, writers)
    return out


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
                 dtype: torch.dtype | None = None, training_summary: dict[str, Any] | None = None) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` and (unless the user wrote one) `README.md`.

    All or nothing: each file goes to a flushed temporary file in the folder first and is renamed over the old one
    afterwards, so a crash mid-save leaves the previous adapter loadable. Empty tensors (what an ungathered ZeRO-3
    save produces) are refused. `dtype=torch.bfloat16` halves the file. `state_dict`, when given (what DeepSpeed /
    FSDP gathered for `Trainer._save`), supplies the tensors. Returns the folder.
    """
    if not hasattr(model, "lowrank_config"):
        raise AdapterError("save_adapter: this model has no hf_lowrank adapters (use hf_lowrank.inject first)")
    found = adapter_modules(model)  # one walk over the model serves the tensors, the metadata and the config
    tensors = adapter_state_dict(model, state_dict, dtype, found)
    metadata = adapter_metadata(model, found)
    if training_summary:
        metadata[META + "training"] = json.dumps(training_summary, sort_keys=True)
    return write_adapter_files(save_directory, tensors, metadata, peft_config_dict(model, found), training_summary)


# ---- reading ------------------------------------------------------------------------------------------------------


@dataclass
class AdapterFiles:
    """An adapter read from disk and checked for integrity (not yet against a model)."""

    folder: Path
    config: LowRankConfig
    peft_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        return self.peft_config.get("base_model_name_or_path") or self.metadata.get(META + "base_model") or None

    @property
    def base_revision(self) -> str | None:
        return self.peft_config.get("revision") or self.metadata.get(META + "base_revision") or None

    @property
    def written_by_us(self) -> bool:
        return META + "version" in self.metadata

    @property
    def trained_shapes(self) -> dict[str, list[int]]:
        return json.loads(self.metadata.get(META + "modules", "{}"))


def resolve_folder(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local adapter folder, or a Hub repo id pulled into the cache."""
    path = Path(src)
    if path.is_dir():
        return path
    s = os.fspath(src)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not path.exists()
    if looks_like_repo and not os.path.exists(s.split("/")[0]):
        from .hub import pull_adapter

        return Path(pull_adapter(s, revision=revision))
    if path.exists():
        raise AdapterError(f"{path} is a file; an adapter is a folder with {WEIGHTS_NAME} and {CONFIG_NAME}")
    raise AdapterError(f"adapter folder {path} does not exist (nor is it a Hub repo id like 'user/name')")


#: adapter_config.json features hf_lowrank cannot apply; `describe_only` reads such adapters for `inspect`.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "layers_to_transform": None}


def read_adapter(src: str | os.PathLike | AdapterFiles, revision: str | None = None, *,
                 describe_only: bool = False) -> AdapterFiles:
    """Read and check an adapter folder (or repo id): config present and valid, weights safetensors and intact.

    `describe_only=True` also accepts configs with features hf_lowrank cannot load (DoRA, biases,
    layers_to_transform), for describing them; `peft_config` keeps the file's values.
    """
    if isinstance(src, AdapterFiles):
        return src
    folder = resolve_folder(src, revision)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path} is missing: {folder} is not an adapter folder (PEFT's format needs "
                           f"{CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        peft_config = json.loads(config_path.read_text())
        if not isinstance(peft_config, dict):
            raise TypeError(f"expected a JSON object, got {type(peft_config).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON for a LoRA config: {e}") from None
    metadata: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    unreadable: AdapterError | None = None
    if weights_path.is_file():
        try:
            metadata, tensors = _read_weights(weights_path)
        except AdapterError as e:  # reported after the config: a non-LoRA config is the better explanation
            unreadable = e
    try:
        readable = {**peft_config, **_UNSUPPORTED} if describe_only else peft_config
        config = LowRankConfig.from_peft_dict(readable, **_config_overrides(peft_config, metadata))
    except TypeError as e:
        raise AdapterError(f"{config_path} is not valid JSON for a LoRA config: {e}") from None
    except ValueError as e:
        raise AdapterError(f"{config_path}: {e}") from None
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder} holds adapter_model.bin (a pickle); hf_lowrank never unpickles. Convert it "
                               f"to {WEIGHTS_NAME} with a tool you trust (e.g. PEFT: save_pretrained(..., "
                               "safe_serialization=True)).")
        raise AdapterError(f"{weights_path} is missing")
    if unreadable is not None:
        raise unreadable
    if not tensors:
        raise AdapterError(f"{weights_path} holds no tensors")
    if not _checksum_matches(metadata, tensors):
        raise AdapterError(f"{weights_path} is corrupted: its tensors do not match the checksum recorded in its header "
                           "when it was saved; save the adapter again or pull a fresh copy")
    for k, t in tensors.items():
        if t.numel() == 0:
            raise AdapterError(f"{weights_path}: tensor {k} is empty (shape {tuple(t.shape)}), as ZeRO-3 saves without "
                               "gathering produce; this adapter cannot be used")
    return AdapterFiles(folder, config, peft_config, tensors, metadata)


def _read_weights(weights_path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The safetensors header metadata and tensors, read in one pass; `AdapterError` when the file cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{weights_path} is corrupted or truncated ({e}); save the adapter again or pull a "
                           "fresh copy") from None
    return metadata, tensors


#: PEFT adds the new head to modules_to_save for these tasks even when the config says null.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _config_overrides(peft_config: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    """Fields adapter_config.json does not hold: quantization (ours records it; PEFT-written adapters get None, a
    16-bit base) and an explicit empty modules_to_save where the file has none, so nothing extra is expected."""
    overrides: dict[str, Any] = {"quantization": None}
    with contextlib.suppress(ValueError, TypeError):
        quant = json.loads(metadata.get(META + "quantization") or "{}")
        overrides.update({k: v for k, v in quant.items() if k in ("quantization", "double_quant", "compute_dtype",
                                                                    "quant_storage")})
    if peft_config.get("modules_to_save") is None and peft_config.get("task_type") not in _HEAD_TASKS:
        overrides["modules_to_save"] = []
    return overrides


# ---- checking against a model and loading --------------------------------------------------------------------------


def _strip(key: str) -> str:
    key = key.removeprefix(PREFIX)
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def expected_shapes(model: nn.Module, config: LowRankConfig,
                    found: AdapterModules | None = None) -> dict[str, tuple[int, ...]]:
    """Model-relative key → shape that an adapter with `config` has on `model` (without changing the model).

    `found`: `adapter_modules(model, config.modules_to_save or [])` when the caller has walked the model already.
    Raises `ValueError` when a module would be both a LoRA target and a saved module.
    """
    found = found or adapter_modules(model, config.modules_to_save or [])
    shapes = {key: tuple(p.shape) for key, p in found.parameters().items()}
    if not found.layers:  # no adapters yet: the layers that injecting `config` would create
        targets = resolve_targets(model, config)
        saved = {name for name, _ in found.saved}
        both = [t for t in targets if t in saved or any(t.startswith(s + ".") for s in saved)]
        if both:
            raise ValueError(f"{both[0]!r} is both a LoRA target and in modules_to_save ({len(both)} such modules); "
                             "a module is either adapted or saved in full, not both")
        for name in targets:
            in_f, out_f = layer_features(model.get_submodule(name))
            r = config.rank_for(name)
            shapes[f"{name}.lora_A.weight"] = (r, in_f)
            shapes[f"{name}.lora_B.weight"] = (out_f, r)
    return shapes


def check_adapter(model: nn.Module, files: AdapterFiles, found: AdapterModules | None = None) -> None:
    """Every key present, no key extra, every shape equal; raises `AdapterError` naming what does not fit."""
    try:
        expected = expected_shapes(model, files.config, found)
    except ValueError as e:
        raise AdapterError(f"{files.config_path} does not fit this model: {e}") from None
    got = {_strip(k): tuple(t.shape) for k, t in files.tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return
    where = f"{files.weights_path} (trained on {files.base_model or 'an unknown base'})"
    this = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: adapter {list(got[k])} vs this model "
                     f"{list(expected[k])} — the adapter was trained on another base than {this}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    raise AdapterError(f"{where} does not fit the model: " + "; ".join(parts) + ". Nothing was loaded.")


@torch.no_grad()
def load_adapter(model: nn.Module, src: str | os.PathLike | AdapterFiles, revision: str | None = None) -> nn.Module:
    """Load an adapter strictly into `model` (injecting layers first when it has none). Returns the model.

    Everything is checked before any parameter changes: on any error the model is left exactly as it was.
    """
    files = read_adapter(src, revision)
    cfg = files.config
    found = adapter_modules(model, cfg.modules_to_save or [])  # the one walk over the model, unless we inject
    check_adapter(model, files, found)
    _warn_if_other_base(model, files)
    if not found.layers:
        inject(model, cfg)
        found = adapter_modules(model, cfg.modules_to_save or [])
    else:  # the layers are there already: take the file's scaling and saved modules, keep our quantization settings
        model.lowrank_config = model.lowrank_config.replace(
            r=cfg.r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern), modules_to_save=cfg.modules_to_save)
    for name, layer in found.layers:
        layer.alpha = cfg.alpha_for(name)
        layer.use_rslora = cfg.use_rslora
        layer.scaling = layer.alpha / (layer.r ** 0.5) if cfg.use_rslora else layer.alpha / layer.r
    params = found.parameters()
    for key, tensor in files.tensors.items():
        p = params[_strip(key)]
        p.copy_(tensor.to(p.dtype))
    return model


def _warn_if_other_base(model: nn.Module, files: AdapterFiles) -> None:
    loaded = getattr(getattr(model, "config", None), "_commit_hash", None)
    recorded = files.metadata.get(META + "base_revision")
    if loaded and recorded and loaded != recorded:
        logger.warning("adapter %s was trained on base revision %s; the base loaded is revision %s",
                       files.folder, recorded, loaded)
