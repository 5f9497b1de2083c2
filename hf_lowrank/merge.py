"""One merge: fold each adapter's ΔW = s·B·A into its base weight, over a state dict.

    base tensors (checkpoint layout) ──► 4-bit layers: dequantize (what the adapter trained against)
                                     ──► + s·B·A in float32 ──► DoRA: × m / ‖W0 + s·B·A‖ per row
                                     ──► cast to the output dtype once
    adapter tensors (modules_to_save copies) ──► replace the base's tensors of the same key
    trainable token rows R (k×d)             ──► replace rows i₁…i_k of the embedding's weight (a tied head follows)

`merge_state_dict` is the fold. `merge(model)` feeds it an in-memory model (a plain 16-bit copy comes out), and
`hf-lowrank merge` (`hf_lowrank.export`) feeds it a base checkpoint shard by shard; both give the same bits.
Nothing is ever requantized: a merged model is 16/32-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from .compat import from_config
from .layers import (
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    LoraLinear,
    SavedModule,
    TiedTokenHead,
    TrainableTokens,
    dense_weight,
    is_4bit,
    is_conv1d,
)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A in float32: (out, r) @ (r, in) -> (out, in)."""
    return (b.float() @ a.float()) * scaling


def merge_state_dict(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
                     scalings: Mapping[str, float], dtype: torch.dtype, *,
                     module_of: Callable[[str], str] = lambda key: key.rsplit(".", 1)[0],
                     transposed: Collection[str] = (), quantized: Collection[str] = (),
                     dequantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     token_rows: Mapping[str, tuple[Sequence[int], torch.Tensor]] | None = None,
                     done: set[str] | None = None) -> dict[str, torch.Tensor]:
    """`base` with every adapter folded in, float tensors cast to `dtype`.

    Args:
        base: checkpoint key → tensor, weights as their modules store them ((in, out) for the modules in
            `transposed`, GPT-2's Conv1D; (out, in) otherwise).
        adapter: model-relative keys: `<module>.lora_A.weight` / `.lora_B.weight` for each module in `scalings`
            (and `.lora_magnitude_vector` for DoRA's), and full tensors of `modules_to_save` (`<module>.weight`),
            which replace the base's.
        scalings: module name → s, for every adapted module.
        module_of: the model's module name for a checkpoint key (checkpoints of a bare base lack its prefix).
        quantized: modules whose weight goes through `dequantize` first (the 4-bit round trip of a QLoRA load).
        token_rows: embedding module name → (row indices, their trained rows (k, d))
            (`trainable_token_indices`), which replace those rows of `<module>.weight`.
        done: filled with the adapted modules and saved keys found, so the caller can tell what `base` lacked.
    """
    done = set() if done is None else done
    token_rows = token_rows or {}
    out: dict[str, torch.Tensor] = {}
    for key, t in base.items():
        module = module_of(key)
        model_key = f"{module}.{key.rsplit('.', 1)[1]}"
        if model_key in adapter and model_key not in scalings:  # a modules_to_save copy
            t = adapter[model_key]
            done.add(model_key)
        elif key.endswith(".weight") and (module in quantized or module in scalings):
            w = t.float().T if module in transposed else t.float()  # (out, in)
            if module in quantized and dequantize is not None:
                w = dequantize(w)
            if module in scalings:
                w = w + delta_weight(adapter[f"{module}.{LORA_A}"], adapter[f"{module}.{LORA_B}"], scalings[module])
                m = adapter.get(f"{module}.{LORA_MAGNITUDE}")
                if m is not None:  # DoRA: rows rescaled to the trained magnitudes
                    w = w * (m.float() / torch.linalg.norm(w, dim=1)).unsqueeze(1)  # (out, in) × (out, 1)
                done.add(module)
            t = w.T if module in transposed else w
        elif key.endswith(".weight") and module in token_rows:
            ids, rows = token_rows[module]
            t = t.clone()
            t[torch.as_tensor(list(ids), dtype=torch.long)] = rows.to(t.dtype)
            done.add(module)
        out[key] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    return out


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """A plain transformers model (no LoRA layers, no 4-bit weights) with every ΔW folded in.

    4-bit weights are dequantized to exactly what the adapter was trained against and the delta is added in float32,
    then cast to `dtype` (default: the config's compute dtype for a QLoRA model, else the model's dtype). The input
    model is not changed.
    """
    cfg = getattr(model, "lowrank_config", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(torch, cfg.compute_dtype) if cfg is not None and cfg.quantization else model.dtype
    plain_config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain_config.dtype = str(dtype).removeprefix("torch.")
    merged = from_config(type(model), plain_config, dtype)
    base, adapter, scalings, transposed, token_rows = _model_tensors(model, dict(merged.named_modules()))
    state = merge_state_dict(base, adapter, scalings, dtype, transposed=transposed, token_rows=token_rows)
    missing, unexpected = merged.load_state_dict(state, strict=False)
    tied = set(getattr(merged, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merge: state mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    merged.tie_weights()
    return merged.eval()


def _model_tensors(model: nn.Module, layout: Mapping[str, nn.Module]):
    """(base, adapter, scalings, transposed, token_rows) of an in-memory model, for `merge_state_dict`.

    Base weights of LoRA and 4-bit layers are taken dense (4-bit ones dequantized) and keyed as in the plain model
    (`<module>.weight`), in the layout of the module of that name in `layout` (the plain model they are meant for):
    a 4-bit layer no longer shows whether it was a Conv1D.
    """
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    scalings: dict[str, float] = {}
    transposed: set[str] = set()
    token_rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue
        if isinstance(module, SavedModule):  # the trained copy, under the module's own name
            handled.append(name)
            base.update((f"{name}.{k}", t) for k, t in module.trainable.state_dict().items())
            continue
        if isinstance(module, TrainableTokens | TiedTokenHead):  # a tied head's weight is the embedding's
            handled.append(name)
            own = module.base_layer.state_dict().items()
            base.update((f"{name}.{k}", t) for k, t in own if isinstance(module, TrainableTokens) or k != "weight")
            if isinstance(module, TrainableTokens) and not module.disabled:
                token_rows[name] = (module.token_indices, module.trainable_tokens_delta.detach())
            continue
        if isinstance(module, LoraLinear):
            src = module.base_layer
            if not module.merged:
                adapter[f"{name}.{LORA_A}"] = module.lora_A.weight
                adapter[f"{name}.{LORA_B}"] = module.lora_B.weight
                if module.lora_magnitude_vector is not None:
                    adapter[f"{name}.{LORA_MAGNITUDE}"] = module.lora_magnitude_vector
                scalings[name] = module.scaling
        elif is_4bit(module):
            src = module
        else:
            continue
        handled.append(name)
        w = dense_weight(src, torch.float32)  # (out, in)
        if is_conv1d(layout.get(name)):
            transposed.add(name)
            w = w.T
        base[f"{name}.weight"] = w
        if getattr(src, "bias", None) is not None:
            base[f"{name}.bias"] = src.bias.detach()
    for key, t in model.state_dict().items():
        if not any(key.startswith(h + ".") for h in handled):
            base[key] = t
    return base, adapter, scalings, transposed, token_rows
