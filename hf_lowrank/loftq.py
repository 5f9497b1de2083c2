"""Quantization-aware initialisation (`init="loftq"`): start the adapters at the best rank-r fix of the NF4 error.

After LoftQ, in the variant that leaves the standard NF4 base untouched (as PEFT's `replace_lora_weights_loftq`):
for every LoRA layer whose frozen weight is the 4-bit Q of the 16-bit W,

    E = W − dequant(Q)                          (out, in)  what quantization lost
    E ≈ U_r·diag(S_r)·V_rᵀ                      truncated SVD: the best rank-r approximation (Eckart–Young)
    B = U_r·√S_r / √s,   A = √S_r·V_rᵀ / √s     so that s·B·A = U_r·diag(S_r)·V_rᵀ

so the model starts as close to the 16-bit original as rank r allows. W is read from the checkpoint one tensor at a
time (safetensors), so the model is never held in 16 bits. With Q fixed, one SVD is already optimal: there is nothing
for more iterations to improve, so none are offered. Per layer the error ratio
‖W − (dequant(Q) + s·B·A)‖ / ‖W − dequant(Q)‖ is returned (below 1: the adapter absorbed part of the error).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .layers import LoraLinear, dense_weight, is_4bit, is_conv1d

logger = logging.getLogger("hf_lowrank")


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key → the safetensors file holding it (a single file or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / Path(v).name for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)  # noqa: SIM118
    raise ValueError(f"init='loftq' reads the 16-bit weights from safetensors, and {folder} has none")


def _checkpoint_key(name: str, keys: dict[str, Path], prefix: str) -> str | None:
    for key in (f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight"):
        if key in keys:
            return key
    return None


def loftq_plan(model: nn.Module, checkpoint: str | Path, names: list[str]) -> dict[str, tuple[Path, str, bool]]:
    """Where each target module over a 4-bit weight finds its 16-bit W: name → (file, key, stored (in, out)).

    Called before the adapters are injected, so a checkpoint that lacks one of those weights is refused (the error
    names it) with the model unchanged.
    """
    keys = _checkpoint_files(Path(checkpoint))
    prefix = getattr(model, "base_model_prefix", "") or ""
    conv1d = _conv1d_modules(model)
    plan = {}
    for name in names:
        if not is_4bit(model.get_submodule(name)):
            continue
        key = _checkpoint_key(name, keys, prefix)
        if key is None:
            raise ValueError(f"init='loftq': {name}.weight is not in {checkpoint}'s safetensors")
        plan[name] = (keys[key], key, name in conv1d)
    return plan


@torch.no_grad()
def loftq_init(model: nn.Module, plan: dict[str, tuple[Path, str, bool]]) -> dict[str, float]:
    """Set A and B of every LoRA layer in `plan` (`loftq_plan`) from the SVD of its quantization error; returns the
    error ratio of each layer (module name → ratio)."""
    from safetensors import safe_open

    ratios: dict[str, float] = {}
    for name, (file, key, transposed) in plan.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoraLinear), name
        with safe_open(file, framework="pt") as f:
            w = f.get_tensor(key).float()
        if transposed:  # GPT-2's Conv1D stores (in, out)
            w = w.T
        error = w - dense_weight(layer.base_layer, torch.float32)  # (out, in)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = (s[: layer.r] / layer.scaling).sqrt()  # (r,)
        layer.lora_B.weight.copy_(u[:, : layer.r] * root)  # (out, r)
        layer.lora_A.weight.copy_(root[:, None] * vh[: layer.r])  # (r, in)
        if layer.lora_magnitude_vector is not None:  # DoRA: m = ‖W0 + s·B·A‖, so y = (W0 + s·B·A)·x at the start
            layer.lora_magnitude_vector.copy_(layer.weight_norm(torch.float32))
        rest = error - layer.delta_weight().float()
        ratios[name] = (rest.norm() / error.norm().clamp_min(1e-12)).item()
    if ratios:
        values = sorted(ratios.values())
        logger.info("hf_lowrank: LoftQ init of %d layers; error ratio median %.3f, max %.3f", len(values),
                    values[len(values) // 2], values[-1])
    return ratios


def _conv1d_modules(model: nn.Module) -> set[str]:
    """Modules that store their weight (in, out) in the checkpoint (GPT-2's Conv1D), from a weightless copy: the
    4-bit layers that replaced them no longer show it."""
    with torch.device("meta"):
        plain = type(model)(model.config)
    return {n for n, m in plain.named_modules() if is_conv1d(m)}
