"""Put `LoraLinear` layers into a model, find them again, switch them off, and fold them into a 16-bit copy.

Adapters are found structurally (`isinstance(m, LoraLinear)`), never by looking for "lora" in a parameter name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import LowRankConfig, name_matches
from .layers import LoraLinear, _is_4bit, dense_weight, is_conv1d, is_linear

logger = logging.getLogger("hf_lowrank")

#: top-level output heads that "all-linear" leaves alone (PEFT does the same for the output embeddings).
HEAD_NAMES = ("lm_head", "score", "classifier")
#: heads that are freshly initialised for a new task and so are trained and saved in full by default.
NEW_HEAD_NAMES = ("score", "classifier")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoRA layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


@dataclass
class AdapterModules:
    """What one walk over a model finds: its LoRA layers and its `modules_to_save` modules, in module order."""

    layers: list[tuple[str, LoraLinear]]
    saved: list[tuple[str, nn.Module]]

    def parameters(self) -> dict[str, nn.Parameter]:
        """Model-relative key → parameter for everything an adapter file holds (PEFT's keys without its prefix)."""
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers:
            params[f"{name}.lora_A.weight"] = layer.lora_A.weight
            params[f"{name}.lora_B.weight"] = layer.lora_B.weight
        for name, module in self.saved:
            params.update((f"{name}.{p}", t) for p, t in module.named_parameters())
        return params


def adapter_modules(model: nn.Module, modules_to_save: list[str] | None = None) -> AdapterModules:
    """`lora_layers` and `saved_modules` in one walk; `modules_to_save` defaults to the model's config."""
    if modules_to_save is None:
        modules_to_save = getattr(getattr(model, "lowrank_config", None), "modules_to_save", None)
    found = AdapterModules([], [])
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            found.layers.append((name, module))
        elif modules_to_save and name and name_matches(modules_to_save, name):
            found.saved.append((name, module))
    return found


def has_adapters(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every `modules_to_save` module (trained and saved in full)."""
    yield from adapter_modules(model).saved


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None


def resolve_targets(model: nn.Module, config: LowRankConfig) -> list[str]:
    """Names of the modules `config` adapts, with PEFT's matching rules; raises when none match."""
    head = _output_head(model)
    linear = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    if config.target_modules == "all-linear":
        chosen = [n for n, m in linear if m is not head and n.split(".")[-1] not in HEAD_NAMES]
    else:
        chosen = []
        for name, module in model.named_modules():
            if not name or not name_matches(config.target_modules, name):
                continue
            if isinstance(module, LoraLinear):
                raise ValueError(f"module {name!r} already has a LoRA adapter; inject() once per model.")
            if not is_linear(module):
                raise ValueError(
                    f"target_modules={config.target_modules!r} matched {name!r}, a {type(module).__name__}; LoRA "
                    "here adapts linear layers only (nn.Linear, Conv1D, Linear4bit). Name the linear layers inside it."
                )
            chosen.append(name)
    if config.exclude_modules:
        chosen = [n for n in chosen if not name_matches(config.exclude_modules, n)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n, _ in linear})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched no layer; "
            f"linear layers in this model end in: {', '.join(suffixes) or '(none)'}"
        )
    return chosen


def default_modules_to_save(model: nn.Module) -> list[str] | None:
    """A new classification head (`score` / `classifier`) is trained and saved in full."""
    heads = [n for n, _ in model.named_children() if n in NEW_HEAD_NAMES]
    return heads or None


def inject(model: nn.Module, config: LowRankConfig | None = None) -> nn.Module:
    """Replace each target layer with a `LoraLinear` around it and freeze everything but A, B and `modules_to_save`.

    Returns the same model object (a transformers model stays one: `generate`, `config`, `save_pretrained` work).
    """
    config = config or LowRankConfig()
    if has_adapters(model):
        raise ValueError("this model already has hf_lowrank adapters; inject() once per model.")
    if config.modules_to_save is None:
        config = config.replace(modules_to_save=default_modules_to_save(model))
    targets = resolve_targets(model, config)
    dtype = getattr(torch, config.adapter_dtype)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoraLinear(base, r=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, init=config.init, dtype=dtype)
        layer.train(base.training)  # from_pretrained returns models in eval mode; dropout must follow
        setattr(parent, child, layer)

    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    model.lowrank_config = config
    for _, module in saved_modules(model):
        for p in module.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)

    from . import seams  # transformers' own hooks; the one module that touches its internals

    seams.attach(model)
    return model


@dataclass
class ParameterSummary:
    trainable: int
    total: int
    base_bytes: int
    adapter_layers: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
                f"{100 * self.share:.4f} || LoRA layers: {self.adapter_layers} || base weights: "
                f"{self.base_bytes / 2**20:.2f} MiB")


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Counts with packed 4-bit weights at their real element count (two 4-bit values share one byte)."""
    trainable = total = base_bytes = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
        else:
            base_bytes += p.numel() * p.element_size()
    return ParameterSummary(trainable, total, base_bytes, sum(1 for _ in lora_layers(model)))


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """Run the base model: every adapter off (merged ones taken out) inside the block, restored after it."""
    layers = [layer for _, layer in lora_layers(model)]
    state = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, state, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """A plain transformers model (no LoRA layers, no 4-bit weights) with every ΔW folded in.

    4-bit weights are dequantized to exactly what the adapter was trained against and the delta is added in 16 bits;
    nothing is requantized. `dtype` defaults to the config's compute dtype. The input model is not changed.
    """
    cfg = getattr(model, "lowrank_config", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(torch, cfg.compute_dtype) if cfg is not None and cfg.quantization else model.dtype
    plain_config = _plain_config(model.config)
    plain_config.dtype = str(dtype).split(".")[-1]
    merged = type(model)._from_config(plain_config, dtype=dtype)
    state = merged_state_dict(model, dtype, layout=merged)
    missing, unexpected = merged.load_state_dict(state, strict=False)
    tied = set(getattr(merged, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merge: state mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    merged.tie_weights()
    return merged.eval()


def merged_state_dict(model: nn.Module, dtype: torch.dtype, layout: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict: LoRA folded in, 4-bit weights dequantized, keys as in the original model.

    Each folded weight is W0 + s·B·A computed in float32, then cast to `dtype` once. Weights come out (out, in) as
    `nn.Linear` stores them, except where the module of that name in `layout` (the plain model they are meant for;
    by default `model` itself) is a GPT-2 `Conv1D`, which stores (in, out). A 4-bit layer no longer shows which of
    the two it was, hence `layout`.
    """
    layout = model if layout is None else layout
    layout_modules = dict(layout.named_modules())
    state: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue
        if isinstance(module, LoraLinear):
            base = module.base_layer
            w = dense_weight(base, torch.float32)
            if not module.merged:
                w = w + module.delta_weight().float()
        elif _is_4bit(module):
            base, w = module, dense_weight(module, torch.float32)
        else:
            continue
        handled.add(name)
        target = layout_modules.get(name)
        conv = is_conv1d(target) or (isinstance(target, LoraLinear) and is_conv1d(target.base_layer))
        state[f"{name}.weight"] = (w.T if conv else w).to(dtype).contiguous()
        if getattr(base, "bias", None) is not None:
            state[f"{name}.bias"] = base.bias.detach().to(dtype)
    for key, t in list(model.state_dict().items()):
        if any(key.startswith(h + ".") for h in handled):
            continue
        state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def _plain_config(config):
    cfg = config.__class__.from_dict(config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg
