"""Adapter folders on disk: save atomically, read and check, load strictly into a model.

Safetensors only: nothing is ever unpickled. Saves are all or nothing per file and serialized per folder
(`hf_lowrank.atomic`); the weights' header records checksums of the tensors and of the config, so a damaged file or
a folder mixing two saves is refused. Loads check everything (header, checksums, values, keys, shapes, ranks)
before the first parameter changes. Local folders only: resolving Hub ids is the loading API's job.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write_files, interrupted_save
from .config import LowRankConfig
from .format import (
    BASE_MODEL,
    BASE_REVISION,
    CARD_NAME,
    CHECKSUM,
    CONFIG_CHECKSUM,
    CONFIG_NAME,
    HEAD_TASKS,
    PICKLED_WEIGHTS,
    TRAINING,
    VERSION,
    WEIGHTS_NAME,
    AdapterError,
    adapter_metadata,
    adapter_state_dict,
    check_one_name_per_tensor,
    checksum_matches,
    config_checksum,
    header_json,
    linked_outside,
    lora_module,
    magnitude_module,
    model_key,
    peft_config_dict,
    recorded_loraplus,
    recorded_quantization,
    tensor_checksum,
    token_module,
)
from .inject import AdapterModules, adapter_modules, inject, mark_trainable, resolve_targets, token_targets
from .layers import LORA_A, LORA_B, LORA_MAGNITUDE, TOKENS_KEY, layer_features
from .patterns import PatternError, first_entry

logger = logging.getLogger("hf_lowrank")

#: dtypes an adapter tensor may have; anything else (int8, bool, fp8) would be silently cast.
TENSOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: adapter_config.json is a few hundred bytes; a larger one is not a LoRA config.
MAX_CONFIG_BYTES = 1 << 20

# ---- writing ------------------------------------------------------------------------------------------------------


def write_adapter_files(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        peft_config: dict[str, Any], training_summary: dict[str, Any] | None = None) -> Path:
    """Write PEFT-format adapter files (`tensors` keyed with the `base_model.model.` prefix) atomically."""
    from safetensors.torch import save_file

    from .card import is_generated_card, model_card

    out = Path(folder)
    for key, t in tensors.items():
        if t.numel() == 0:
            raise AdapterError(
                f"refusing to save {key}: the tensor is empty (shape {tuple(t.shape)}). Under DeepSpeed ZeRO-3 or FSDP "
                "the parameters must be gathered first; save through Trainer.save_model or model.save_pretrained.")
    metadata = {**metadata, "format": "pt", CHECKSUM: tensor_checksum(tensors),
                CONFIG_CHECKSUM: config_checksum(peft_config)}
    config_text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    writers: dict[str, Callable[[str], None]] = {
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata=metadata),
        CONFIG_NAME: lambda p: Path(p).write_text(config_text),
    }
    card = out / CARD_NAME
    if not card.is_file() or is_generated_card(card.read_text(errors="ignore")):
        text = model_card(peft_config, metadata, training_summary)
        writers[CARD_NAME] = lambda p: Path(p).write_text(text)
    atomic_write_files(out, writers)
    return out


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
                 dtype: torch.dtype | None = None, training_summary: dict[str, Any] | None = None,
                 base_model: str | None = None) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` and (unless the user wrote one) `README.md`.

    All or nothing per file, one save per folder at a time (see `hf_lowrank.atomic`). Empty tensors (what an
    ungathered ZeRO-3 save produces) are refused. `dtype=torch.bfloat16` halves the file. `state_dict`, when given
    (what DeepSpeed / FSDP gathered for `Trainer._save`), supplies the tensors. `base_model` overrides the base the
    config records (default: where the model was loaded from). Returns the folder.
    """
    if not hasattr(model, "lowrank_config"):
        raise AdapterError("save_adapter: this model has no hf_lowrank adapters (use hf_lowrank.inject first)")
    found = adapter_modules(model)  # one walk over the model serves the tensors, the metadata and the config
    tensors = adapter_state_dict(model, state_dict, dtype, found)
    metadata = adapter_metadata(model, found)
    if training_summary:
        metadata[TRAINING] = json.dumps(training_summary, sort_keys=True)
    config = peft_config_dict(model, found, base_model=base_model)
    return write_adapter_files(save_directory, tensors, metadata, config, training_summary)


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
        return self.peft_config.get("base_model_name_or_path") or self.metadata.get(BASE_MODEL) or None

    @property
    def base_revision(self) -> str | None:
        return self.peft_config.get("revision") or self.metadata.get(BASE_REVISION) or None

    @property
    def written_by_us(self) -> bool:
        return VERSION in self.metadata

    @functools.cached_property
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """Model-relative key → tensor (the file's keys without PEFT's prefix), computed once."""
        return {model_key(k): t for k, t in self.tensors.items()}

    def lora_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{module: {"A": (r, in), "B": (out, r)}}, in file order."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.model_tensors.items():
            found = lora_module(key)
            if found is not None:
                out.setdefault(found[0], {})[found[1]] = t
        return out

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """modules_to_save copies: model key → tensor."""
        return {k: t for k, t in self.model_tensors.items()
                if lora_module(k) is None and token_module(k) is None and magnitude_module(k) is None}

    def magnitudes(self) -> dict[str, torch.Tensor]:
        """DoRA's magnitude vectors: {module: m (out,)}."""
        return {m: t for k, t in self.model_tensors.items() if (m := magnitude_module(k)) is not None}

    def token_rows(self) -> dict[str, tuple[list[int], torch.Tensor]]:
        """{embedding module: (row indices, trained rows (k, d))} for `trainable_token_indices`."""
        spec, out = self.config.trainable_token_indices, {}
        first = first_entry(spec) if isinstance(spec, dict) else None  # the key naming a module (as injection reads it)
        for key, t in self.model_tensors.items():
            module = token_module(key)
            if module is not None:
                ids = spec if isinstance(spec, list) else spec[k] if first and (k := first(module)) is not None else []
                out[module] = (list(ids), t)
        return out

    def scalings(self) -> dict[str, tuple[int, float]]:
        """{module: (rank, scaling)} as the adapter's layers apply them (ranks from the tensors themselves)."""
        from .layers import lora_scaling

        cfg = self.config
        return {m: (ab["A"].shape[0], lora_scaling(cfg.alpha_for(m), ab["A"].shape[0], cfg.use_rslora))
                for m, ab in self.lora_tensors().items()}


#: adapter_config.json features hf_lowrank cannot apply; `describe_only` reads such adapters for `inspect`.
_UNSUPPORTED = {"bias": "none", "layers_to_transform": None}


def read_adapter(src: str | os.PathLike | AdapterFiles, *, describe_only: bool = False) -> AdapterFiles:
    """Read and check a local adapter folder: config valid, weights safetensors, intact, finite and consistent with
    the config (A and B in pairs, each pair's rank the config's for that module). `AdapterError` otherwise.

    `describe_only=True` also accepts configs with features hf_lowrank cannot load (biases,
    layers_to_transform), for describing them; `peft_config` keeps the file's values.
    """
    if isinstance(src, AdapterFiles):
        return src
    folder = Path(src)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise AdapterError(f"adapter folder {folder} {what}; an adapter is a folder with {WEIGHTS_NAME} and "
                           f"{CONFIG_NAME}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if (link := linked_outside(folder, path)) is not None:
            raise AdapterError(f"{path} is a symlink to {link!r}, outside {folder}: an adapter is read from its folder")
    peft_config = _read_config(folder)
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
    except (TypeError, ValueError, PatternError) as e:
        raise AdapterError(f"{config_path}: {e}") from None
    if not weights_path.is_file():
        if (folder / PICKLED_WEIGHTS).is_file():
            raise AdapterError(f"{folder} holds {PICKLED_WEIGHTS} (a pickle); hf_lowrank never unpickles. Convert it "
                               f"to {WEIGHTS_NAME} with a tool you trust (e.g. PEFT: save_pretrained(..., "
                               "safe_serialization=True)).")
        raise AdapterError(f"{weights_path} is missing")
    if unreadable is not None:
        raise unreadable
    check_one_name_per_tensor(weights_path, tensors)
    files = AdapterFiles(folder, config, peft_config, tensors, metadata)
    _check_integrity(files)
    return files


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path} is missing: {folder} is not an adapter folder (PEFT's format needs "
                           f"{CONFIG_NAME} beside {WEIGHTS_NAME})")
    with open(config_path, "rb") as f:  # at most the cap, whatever stat says (a pipe, /proc, a file swapped in)
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{config_path} is over {MAX_CONFIG_BYTES:,} bytes; a LoRA config is a few hundred")
    try:
        peft_config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON for a LoRA config: {e}") from None
    except RecursionError:
        raise AdapterError(f"{config_path} is nested too deeply to be a LoRA config") from None
    if not isinstance(peft_config, dict):
        raise AdapterError(f"{config_path} is not valid JSON for a LoRA config: expected a JSON object, got "
                           f"{type(peft_config).__name__}")
    return peft_config


def _read_weights(weights_path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The safetensors header metadata and tensors, read in one pass; `AdapterError` when the file cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
        raise AdapterError(f"{weights_path} is corrupted or truncated ({e}); save the adapter again or pull a "
                           "fresh copy") from None
    return metadata, tensors


def _check_integrity(files: AdapterFiles) -> None:
    """Checksums, dtypes, finite values, and the tensors' consistency with the config."""
    where, tensors = files.weights_path, files.tensors
    if not tensors:
        raise AdapterError(f"{where} holds no tensors")
    if not checksum_matches(files.metadata, tensors):
        raise AdapterError(f"{where} is corrupted: its tensors do not match the checksum recorded in its header "
                           "when it was saved; save the adapter again or pull a fresh copy")
    recorded = files.metadata.get(CONFIG_CHECKSUM)
    if recorded is not None and recorded != config_checksum(files.peft_config):
        interrupted = " (a save into this folder was interrupted)" if interrupted_save(files.folder) else ""
        raise AdapterError(f"{files.config_path} does not belong to {where}: the weights were saved with another "
                           f"config{interrupted}. The folder mixes two saves; save the adapter again or pull a "
                           "fresh copy")
    for key, t in tensors.items():
        if t.dtype not in TENSOR_DTYPES:
            raise AdapterError(f"{where}: tensor {key} has dtype {str(t.dtype).removeprefix('torch.')}; adapter "
                               "tensors are float32, float16 or bfloat16")
        if t.dim() == 0 or t.numel() == 0:
            what = "is a 0-dim scalar" if t.numel() else "is empty, as ZeRO-3 saves without gathering produce"
            raise AdapterError(f"{where}: tensor {key} {what} (shape {tuple(t.shape)}); this adapter cannot be used")
    if not _all_finite(tensors):
        key = next(k for k, t in tensors.items() if not torch.isfinite(t).all())
        raise AdapterError(f"{where}: tensor {key} holds NaN or infinite values; this adapter cannot be used")
    magnitudes = files.magnitudes()
    for module, pair in files.lora_tensors().items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise AdapterError(f"{where}: {module} has lora_{''.join(sorted(set(pair)))} but no "
                               f"lora_{''.join(sorted(missing))} tensor")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: {module}'s lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form a "
                               "rank-r pair (A: r×in, B: out×r)")
        r = files.config.rank_for(module)
        m = magnitudes.get(module)
        if (m is not None) != files.config.use_dora or (m is not None and list(m.shape) != [b.shape[0]]):
            what = f"a magnitude of shape {list(m.shape)}" if m is not None else "no lora_magnitude_vector"
            raise AdapterError(f"{where}: {module} has {what} with use_dora={files.config.use_dora} and lora_B "
                               f"{list(b.shape)}; the files do not belong together")
        if a.shape[0] != r:
            raise AdapterError(f"{where}: {module} has rank {a.shape[0]} in its tensors but {r} in "
                               f"{CONFIG_NAME} (r / rank_pattern); the files do not belong together")
    scale = [s for _, s in files.scalings().values()]
    if scale and not all(math.isfinite(s) for s in scale):
        raise AdapterError(f"{files.config_path}: lora_alpha gives a non-finite scaling")


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether no tensor holds NaN or ±inf: one check per dtype over all of its tensors at once (a check per tensor
    costs more than reading a small adapter). A finite fp32 sum proves it (NaN and ±inf propagate into a sum), in
    one pass without a boolean tensor; only a non-finite sum (a bad value, or finite values overflowing it) is
    checked element by element."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    for dtype, group in by_dtype.items():
        flat = torch.cat(group)
        total = flat.sum(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(flat).all()):
            return False
    return True


def _config_overrides(peft_config: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    """Fields adapter_config.json does not hold: quantization (ours records it; PEFT-written adapters get None, a
    16-bit base) and an explicit empty modules_to_save where the file has none, so nothing extra is expected."""
    overrides: dict[str, Any] = {"quantization": None}
    try:
        quant = recorded_quantization(metadata)
        overrides["loraplus_lr_ratio"] = recorded_loraplus(metadata)
        header_json(metadata, TRAINING)  # read when pushing: checked here, with the rest of the header
    except ValueError as e:
        raise AdapterError(f"header entry {e}: the adapter's metadata is damaged") from None
    overrides.update(quant or {})
    if peft_config.get("modules_to_save") is None and peft_config.get("task_type") not in HEAD_TASKS:
        overrides["modules_to_save"] = []
    return overrides


# ---- checking against a model and loading --------------------------------------------------------------------------


def expected_shapes(model: nn.Module, config: LowRankConfig,
                    found: AdapterModules | None = None) -> dict[str, tuple[int, ...]]:
    """Model-relative key → shape that an adapter with `config` has on `model` (without changing the model).

    `found`: `adapter_modules(model, config.modules_to_save or [])` when the caller has walked the model already.
    Raises `ValueError` when a module would be both a LoRA target and a saved module. Works on meta-device models.
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
            shapes[f"{name}.{LORA_A}"] = (r, in_f)
            shapes[f"{name}.{LORA_B}"] = (out_f, r)
            if config.use_dora:
                shapes[f"{name}.{LORA_MAGNITUDE}"] = (out_f,)
        for name, ids in token_targets(model, config).items():
            shapes[f"{name}.{TOKENS_KEY}"] = (len(ids), model.get_submodule(name).weight.shape[1])
    return shapes


def check_adapter(model: nn.Module, files: AdapterFiles, found: AdapterModules | None = None) -> None:
    """Every key present, no key extra, every shape equal; raises `AdapterError` naming what does not fit."""
    try:
        expected = expected_shapes(model, files.config, found)
    except (ValueError, PatternError) as e:
        raise AdapterError(f"{files.config_path} does not fit this model: {e}") from None
    got = {model_key(k): tuple(t.shape) for k, t in files.tensors.items()}
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
def load_adapter(model: nn.Module, src: str | os.PathLike | AdapterFiles) -> nn.Module:
    """Load a local adapter strictly into `model` (injecting layers first when it has none). Returns the model.

    Everything is checked before any parameter changes: on any error the model is left exactly as it was.
    """
    files = read_adapter(src)
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
            alpha_pattern=dict(cfg.alpha_pattern), modules_to_save=cfg.modules_to_save,
            trainable_token_indices=cfg.trainable_token_indices)
        mark_trainable(model, found)
    for name, layer in found.layers:
        layer.set_scaling(cfg.alpha_for(name), cfg.use_rslora)
    params = found.parameters()
    for key, tensor in files.tensors.items():
        p = params[model_key(key)]
        p.copy_(tensor.to(p.dtype))
    return model


def _warn_if_other_base(model: nn.Module, files: AdapterFiles) -> None:
    loaded = getattr(getattr(model, "config", None), "_commit_hash", None)
    recorded = files.metadata.get(BASE_REVISION)
    if loaded and recorded and loaded != recorded:
        logger.warning("adapter %s was trained on base revision %s; the base loaded is revision %s",
                       files.folder, recorded, loaded)
