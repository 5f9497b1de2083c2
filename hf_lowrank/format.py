"""The adapter file format (PEFT's), in one place: file names, tensor keys, header metadata, checksums.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r×in), ….lora_B.weight (out×r),
                                base_model.model.<module>.weight for modules_to_save; header metadata:
                                format=pt and hf_lowrank.* (version, base, revision, quantization, fingerprint,
                                adapted modules' shapes, xxh3 checksums of the tensors and of the config)
    adapter_config.json         PEFT's LoraConfig fields only (unknown keys make PEFT warn)
    README.md                   model card (written when the folder has none)

This module builds what goes into those files from a model; it reads and writes nothing (`hf_lowrank.state` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import LowRankConfig
from .inject import AdapterModules, adapter_modules
from .layers import LORA_A, LORA_B, LORA_MAGNITUDE, TOKENS_KEY, is_conv1d
from .version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
#: what an adapter folder is made of: what is saved, pushed and pulled; nothing else ever leaves.
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
#: a pickled adapter, never read.
PICKLED_WEIGHTS = "adapter_model.bin"
#: files of a full model (a checkpoint holding any of these is not adapter-only).
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

PREFIX = "base_model.model."
META = "hf_lowrank."
VERSION, BASE_MODEL, BASE_REVISION = META + "version", META + "base_model", META + "base_revision"
ARCHITECTURE, QUANTIZATION, FINGERPRINT = META + "base_architecture", META + "quantization", META + "fingerprint"
MODULES, TRAINING = META + "modules", META + "training"
CHECKSUM = META + "checksum"
CONFIG_CHECKSUM = META + "config_checksum"
LEGACY_CRC32 = META + "crc32"  # the checksum key of adapters saved by earlier development versions
#: LoRA+'s learning-rate ratio (a training setting PEFT's config has no field for), when trained with it.
LORAPLUS = META + "loraplus_lr_ratio"
QUANT_FIELDS = ("quantization", "double_quant", "compute_dtype", "quant_storage")


class AdapterError(ValueError):
    """An adapter file or folder that cannot be used as it is; the message names the file and the fix."""


# ---- keys ---------------------------------------------------------------------------------------------------------


def model_key(file_key: str) -> str:
    """The model-relative key for a file key (PEFT's prefix and its `default` adapter name removed)."""
    key = file_key.removeprefix(PREFIX)
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


#: a repo's folder in the Hub cache: `models--org--name` (or datasets--, spaces--), above `snapshots/<revision>`.
_CACHED_REPO = re.compile(r"(models|datasets|spaces)--([^/\\]+)")


def cached_repo(parts: list[str]) -> tuple[int, str, str] | None:
    """Where a path (split into its parts) lies in the Hub cache: (the index of its `snapshots` part, the repo's kind
    ("models", "datasets", "spaces"), its id) when it is at or below `<kind>--org--name/snapshots/<revision>`, the
    last `snapshots` part counting; None elsewhere (a folder that merely has a `snapshots` above it is not the cache).
    """
    at = len(parts) - 1 - parts[::-1].index("snapshots") if "snapshots" in parts[:-1] else 0
    match = _CACHED_REPO.fullmatch(parts[at - 1]) if at > 0 else None
    return None if match is None else (at, match.group(1), match.group(2).replace("--", "/"))


def linked_outside(folder, path) -> str | None:
    """Where `path` links to when it is a symlink out of `folder` (None otherwise). A Hub cache snapshot's links to
    its repo's `blobs` are inside: that is how huggingface_hub stores every file it downloads (`cached_repo`)."""
    if not os.path.islink(path):
        return None
    real, target = os.path.realpath(folder), os.path.realpath(path)
    parts = real.split(os.sep)
    cached = cached_repo(parts)
    blobs = os.sep.join([*parts[:cached[0]], "blobs"]) if cached else None  # <repo>/blobs for <repo>/snapshots/<rev>/…
    return None if os.path.dirname(target) in (real, blobs) else os.readlink(path)


def check_one_name_per_tensor(weights_path, tensors: dict) -> None:
    """PEFT's prefix and its `default` adapter name are optional in file keys: two keys that name one parameter
    (`x.lora_A.weight` and `base_model.model.x.lora_A.default.weight`) are refused, not loaded one over the other."""
    seen: dict[str, str] = {}
    for key in tensors:
        other = seen.setdefault(model_key(key), key)
        if other != key:
            raise AdapterError(f"{weights_path} holds both {other!r} and {key!r}, two names for the parameter "
                               f"{model_key(key)!r}; an adapter file names each tensor once")


def lora_module(key: str) -> tuple[str, str] | None:
    """(module, "A" or "B") for a LoRA tensor's model key, None for a modules_to_save tensor."""
    for suffix, which in ((LORA_A, "A"), (LORA_B, "B")):
        if key.endswith("." + suffix):
            return key.removesuffix("." + suffix), which
    return None


def magnitude_module(key: str) -> str | None:
    """The LoRA layer's name for a DoRA magnitude key (`<module>.lora_magnitude_vector`)."""
    return key.removesuffix("." + LORA_MAGNITUDE) if key.endswith("." + LORA_MAGNITUDE) else None


def token_module(key: str) -> str | None:
    """The embedding's name for a trainable-token-rows key (`<module>.token_adapter.trainable_tokens_delta`)."""
    return key.removesuffix("." + TOKENS_KEY) if key.endswith("." + TOKENS_KEY) else None


#: model class name suffix → PEFT's task_type, and back to the transformers Auto class that builds it.
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
              "ForQuestionAnswering": "QUESTION_ANS", "Model": "FEATURE_EXTRACTION"}
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
#: PEFT adds the new head to modules_to_save for these tasks even when the config says null.
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type from the model class name (GPT2LMHeadModel → CAUSAL_LM; BertModel → FEATURE_EXTRACTION)."""
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_model_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub model id ("org/name" or "name"), None for local paths and empty values."""
    if not name or name.startswith((".", "/", "~")) or os.path.isabs(name) or os.path.isdir(name):
        return None
    return name if _HUB_ID.fullmatch(name) and not name.endswith((".", "-")) else None


# ---- building the files' contents from a model ----------------------------------------------------------------------


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
    for key, (state_key, param) in found.entries().items():
        t = state_dict[state_key] if state_dict is not None and state_key in state_dict else param
        t = t.detach()
        t = t.to("cpu", dtype or t.dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share storage (tied weights)
        seen.add(t.untyped_storage().data_ptr())
        out[PREFIX + key] = t
    return out


def _fingerprint(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def peft_config_dict(model: nn.Module, found: AdapterModules | None = None,
                     base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json for `model`; `base_model` overrides the base it records (default: where it was loaded)."""
    cfg: LowRankConfig = model.lowrank_config
    found = found or adapter_modules(model)
    targets = cfg.target_modules
    if targets == "all-linear" or isinstance(targets, list):
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in found.layers})
    hf_config = getattr(model, "config", None)
    conv = any(is_conv1d(layer.base_layer) for _, layer in found.layers)
    base = base_model or getattr(hf_config, "_name_or_path", None) or None
    if base and os.path.isfile(os.path.join(base, "config.json")):  # a local model folder, made absolute: loadable
        base = os.path.abspath(base)  # from anywhere, never taken for a Hub id (an output dir named so is not one)
    return cfg.to_peft_dict(task_type=task_type(model),
                            base_model_name_or_path=base,
                            revision=getattr(hf_config, "_commit_hash", None) or None, fan_in_fan_out=conv,
                            target_modules=targets)


def adapter_metadata(model: nn.Module, found: AdapterModules | None = None) -> dict[str, str]:
    cfg: LowRankConfig = model.lowrank_config
    hf_config = getattr(model, "config", None)
    found = found or adapter_modules(model)
    shapes = {name: [layer.out_features, layer.in_features] for name, layer in found.layers}
    quant = {f: getattr(cfg, f) for f in QUANT_FIELDS} if cfg.quantization else {"quantization": None}
    extra = {LORAPLUS: repr(float(cfg.loraplus_lr_ratio))} if cfg.loraplus_lr_ratio is not None else {}
    return {
        **extra,
        "format": "pt",
        VERSION: __version__,
        BASE_MODEL: hub_model_id(getattr(hf_config, "_name_or_path", "")) or "",  # never a local path
        BASE_REVISION: getattr(hf_config, "_commit_hash", None) or "",
        ARCHITECTURE: ",".join(getattr(hf_config, "architectures", None) or [type(model).__name__]),
        QUANTIZATION: json.dumps(quant, sort_keys=True),
        FINGERPRINT: _fingerprint(shapes),
        MODULES: json.dumps(shapes, sort_keys=True, separators=(",", ":")),
    }


# ---- checksums ----------------------------------------------------------------------------------------------------


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


#: adapter_config.json fields that change what the adapter computes; the config checksum covers exactly these, so
#: editing the recorded base path or revision by hand keeps an adapter loadable.
COMPUTED_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules",
                   "modules_to_save", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out",
                   "layers_to_transform", "task_type")
#: computed fields added later: covered only when set, so adapters saved before them keep their checksum.
LATER_COMPUTED_FIELDS = ("trainable_token_indices",)


def config_checksum(peft_config: dict[str, Any]) -> str:
    """xxh3-64 of the fields of adapter_config.json that change the adapter's outputs, as "xxh3_64:<hex>".

    Recorded in the weights' header, it ties the two files of one save together: a folder that holds the weights of
    one save and the config of another (a crash between renames, a hand-made mix) is refused instead of loading
    with the wrong scaling.
    """
    import xxhash

    fields = {k: peft_config.get(k) for k in COMPUTED_FIELDS}
    fields.update((k, peft_config[k]) for k in LATER_COMPUTED_FIELDS if peft_config.get(k) is not None)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return "xxh3_64:" + xxhash.xxh3_64(text.encode()).hexdigest()


def _legacy_crc32(tensors: dict[str, torch.Tensor]) -> str:
    """The CRC-32 that development versions before the switch to xxh3 recorded, over the same bytes."""
    import zlib

    crc = 0

    def update(data) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    _feed_tensors(tensors, update)
    return f"{crc:08x}"


def checksum_matches(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """True when the header records no checksum (PEFT's files) or the one it records matches the tensors; files
    saved by development versions before the switch to xxh3 carry a CRC-32 (`hf_lowrank.crc32`), checked as such."""
    if CHECKSUM in metadata:
        return metadata[CHECKSUM] == tensor_checksum(tensors)
    if LEGACY_CRC32 in metadata:
        return metadata[LEGACY_CRC32] == _legacy_crc32(tensors)
    return True


def header_json(metadata: dict[str, str], key: str) -> Any:
    """A JSON entry of a safetensors header (None when absent). A file controls it: malformed or too deeply nested
    JSON raises `ValueError` naming the entry."""
    try:
        return json.loads(metadata.get(key, "null"))
    except RecursionError:
        raise ValueError(f"{key} is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{key} is not valid JSON ({e})") from None


def recorded_loraplus(metadata: dict[str, str]) -> float | None:
    """LoRA+'s ratio the header records (None when none). Raises `ValueError` when it is not a number."""
    return float(metadata[LORAPLUS]) if LORAPLUS in metadata else None


def recorded_quantization(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The quantization settings the header records (None when it records none, as in PEFT's files).
    Raises `ValueError` when the entry is not a JSON object."""
    if QUANTIZATION not in metadata:
        return None
    quant = header_json(metadata, QUANTIZATION)
    if not isinstance(quant, dict):
        raise ValueError(f"{QUANTIZATION} is {type(quant).__name__}, not an object")
    return {k: v for k, v in quant.items() if k in QUANT_FIELDS}
