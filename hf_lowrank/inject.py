"""Put `LoraLinear` layers into a model, find them again, freeze the rest, and switch them off.

Adapters are found structurally (`isinstance(m, LoraLinear)`), never by looking for "lora" in a parameter name.
Pure: this module knows no Trainer, no files and no network, and patches nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LowRankConfig
from .layers import (
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    TOKENS_DELTA,
    TOKENS_KEY,
    LoraLinear,
    SavedModule,
    TiedTokenHead,
    TrainableTokens,
    is_linear,
)
from .patterns import dotted_suffixes, first_entry, name_matcher

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
    """What one walk over a model finds: its LoRA layers, its `modules_to_save` modules and its embeddings with
    trainable rows, in module order."""

    layers: list[tuple[str, LoraLinear]]
    saved: list[tuple[str, nn.Module]]  # a SavedModule, or (before injection) the plain module it would wrap
    tokens: list[tuple[str, TrainableTokens]] = field(default_factory=list)

    def parameters(self) -> dict[str, nn.Parameter]:
        """Model-relative key → parameter for everything an adapter file holds (PEFT's keys without its prefix)."""
        return {key: p for key, (_, p) in self.entries().items()}

    def entries(self) -> dict[str, tuple[str, nn.Parameter]]:
        """File key (model-relative) → (the key of that parameter in the model's state_dict, the parameter)."""
        out: dict[str, tuple[str, nn.Parameter]] = {}
        for name, layer in self.layers:
            out[f"{name}.{LORA_A}"] = (f"{name}.{LORA_A}", layer.lora_A.weight)
            out[f"{name}.{LORA_B}"] = (f"{name}.{LORA_B}", layer.lora_B.weight)
            if layer.lora_magnitude_vector is not None:
                out[f"{name}.{LORA_MAGNITUDE}"] = (f"{name}.{LORA_MAGNITUDE}", layer.lora_magnitude_vector)
        for name, module in self.saved:
            inner, prefix = (module.trainable, f"{name}.trainable") if isinstance(module, SavedModule) else \
                (module, name)
            out.update((f"{name}.{p}", (f"{prefix}.{p}", t)) for p, t in inner.named_parameters())
        for name, module in self.tokens:
            out[f"{name}.{TOKENS_KEY}"] = (f"{name}.{TOKENS_DELTA}", module.trainable_tokens_delta)
        return out


def adapter_modules(model: nn.Module, modules_to_save: list[str] | None = None) -> AdapterModules:
    """LoRA layers and saved modules in one walk, found structurally (`LoraLinear`, `SavedModule`).

    `modules_to_save` (names, PEFT's matching) also finds the plain modules an injection would wrap, for checking
    an adapter file against a model before anything changes; it defaults to the model's config.
    """
    if modules_to_save is None:
        modules_to_save = getattr(getattr(model, "lowrank_config", None), "modules_to_save", None)
    found = AdapterModules([], [])
    inside: list[str] = []  # saved modules' own children are not searched
    saved = name_matcher(modules_to_save) if modules_to_save else None
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in inside):
            continue
        if isinstance(module, LoraLinear):
            found.layers.append((name, module))
        elif isinstance(module, TrainableTokens):
            found.tokens.append((name, module))
            inside.append(name)
        elif isinstance(module, SavedModule) or (saved is not None and name and saved(name)):
            found.saved.append((name, module))
            inside.append(name)
    return found


def has_adapters(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every `modules_to_save` module (trained and saved in full)."""
    yield from adapter_modules(model).saved


def wrap_saved(model: nn.Module, found: AdapterModules) -> AdapterModules:
    """Replace each plain module of `found.saved` by a `SavedModule` around it; returns the updated walk."""
    saved = []
    for name, module in found.saved:
        if not isinstance(module, SavedModule):
            parent_name, _, child = name.rpartition(".")
            module = SavedModule(module)
            setattr(model.get_submodule(parent_name), child, module)
        saved.append((name, module))
    return AdapterModules(found.layers, saved, found.tokens)


def token_targets(model: nn.Module, config: LowRankConfig) -> dict[str, list[int]]:
    """{embedding name: row indices} that `config.trainable_token_indices` trains; raises when a name matches no
    embedding or an index is past its last row."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    if isinstance(spec, dict):  # {module name: ids}, a name matching as in target_modules; the first key counts
        names = [n for n, _ in model.named_modules() if n]
        first = first_entry(spec)
        chosen = {n: list(spec[key]) for n in names if (key := first(n)) is not None}
        named = {s for n in names for s in dotted_suffixes(n)}
        unmatched = [key for key in spec if key not in named]
        if unmatched:
            raise ValueError(f"trainable_token_indices names {unmatched[0]!r}, which matches no module")
    else:
        emb = model.get_input_embeddings()
        chosen = {next(n for n, m in model.named_modules() if m is emb): list(spec)}
    for name, ids in chosen.items():
        module = model.get_submodule(name)
        rows = getattr(module, "num_embeddings", None)
        if rows is None or getattr(module, "weight", None) is None:
            raise ValueError(f"trainable_token_indices: {name!r} is a {type(module).__name__}, not an embedding")
        if max(ids) >= rows:
            raise ValueError(f"trainable_token_indices: token {max(ids)} is past {name!r}'s {rows} rows; after adding "
                             "tokens, call model.resize_token_embeddings(len(tokenizer)) and save the base first")
    return chosen


def wrap_tokens(model: nn.Module, config: LowRankConfig, targets: dict[str, list[int]]) -> None:
    """Wrap each embedding of `targets` (`token_targets`) in `TrainableTokens`, and an output head tied to it in
    `TiedTokenHead`."""
    dtype = getattr(torch, config.adapter_dtype)
    head = output_head(model)
    for name, ids in targets.items():
        parent_name, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        tokens = TrainableTokens(base, ids, dtype=dtype)
        setattr(model.get_submodule(parent_name), child, tokens)
        if head is not None and getattr(head, "weight", None) is base.weight:
            head_name = next(n for n, m in model.named_modules() if m is head)
            parent_name, _, child = head_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, TiedTokenHead(head, tokens))


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (`get_output_embeddings()`), or None when it has or declares none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None


def resolve_targets(model: nn.Module, config: LowRankConfig) -> list[str]:
    """Names of the modules `config` adapts, with PEFT's matching rules; raises when none match."""
    head = output_head(model)
    linear = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    if config.target_modules == "all-linear":
        chosen = [n for n, m in linear if m is not head and n.split(".")[-1] not in HEAD_NAMES]
    else:
        chosen, targeted = [], name_matcher(config.target_modules)
        for name, module in model.named_modules():
            if not name or not targeted(name):
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
        excluded = name_matcher(config.exclude_modules)
        chosen = [n for n in chosen if not excluded(n)]
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
    tokens = token_targets(model, config)  # (both raise before anything changes)
    dtype = getattr(torch, config.adapter_dtype)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoraLinear(base, r=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, init=config.init, dtype=dtype, use_dora=config.use_dora)
        layer.train(base.training)  # from_pretrained returns models in eval mode; dropout must follow
        setattr(parent, child, layer)

    wrap_tokens(model, config, tokens)
    model.lowrank_config = config
    mark_trainable(model, wrap_saved(model, adapter_modules(model)))
    return model


def mark_trainable(model: nn.Module, found: AdapterModules | None = None) -> None:
    """Freeze every parameter but the adapters' A and B, trainable token rows and the float parameters of
    `modules_to_save`."""
    found = found or adapter_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in found.parameters().values():
        if p.is_floating_point():
            p.requires_grad_(True)


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
    """Run the base model exactly: every adapter off (merged ones taken out) and every saved module back to its
    original inside the block; all restored after it."""
    found = adapter_modules(model, [])
    layers = [layer for _, layer in found.layers]
    saved = [m for _, m in found.saved if isinstance(m, SavedModule)] + [m for _, m in found.tokens]
    state = [(layer.disabled, layer.merged) for layer in layers]
    saved_state = [m.disabled for m in saved]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        for m in saved:
            m.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, state, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()
        for m, disabled in zip(saved, saved_state, strict=True):
            m.disabled = disabled
