"""`LoraLinear`: a frozen linear layer plus a trainable low-rank update.

          x (…, in)
          ├───────────────► base_layer: W0 (out×in), frozen; nn.Linear, GPT-2's Conv1D or bnb Linear4bit (NF4)
          └─ dropout ─► A (r×in, Kaiming-uniform) ─► B (out×r, zeros) ─► × α/r
                                                                          ▼
          y = W0·x + (α/r)·B·A·x                                          +

B starts at zero, so a fresh adapter leaves the base output unchanged; gradients reach only A and B:
g_B = (α/r)·g_ΔW·Aᵀ and g_A = (α/r)·Bᵀ·g_ΔW, where g_ΔW = Gᵀx for an upstream gradient G.

DoRA (weight-decomposed LoRA, Liu et al. 2024; ``use_dora=True``) adds a trainable magnitude m (out,):

          y = m ⊙ (W0 + s·B·A)·x / ‖W0 + s·B·A‖ + b,   ‖·‖ the norm of each output row (the paper's column norm)
            = g ⊙ (W0·x) + g ⊙ s·B·A·x + b,            g = m / ‖W0 + s·B·A‖ (out,)

m starts at ‖W0‖, so a fresh adapter again leaves the output unchanged. The norm is treated as a constant (no
gradient through it, section 4.3 of the paper, as PEFT does) and recomputed every forward from the dense weight
(dequantized for Linear4bit) under no_grad; it is never stored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .compat import shield_cpu_repack
from .lora_ops import add_low_rank_, dropped_linear, lora_linear, zeroed
from .lora_ops import cast as _cast

#: the adapter's parameter names inside a LoRA layer, as PEFT's files key them (`<module>.lora_A.weight`).
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
#: DoRA's magnitude vector m (out,), PEFT's name (`<module>.lora_magnitude_vector`).
LORA_MAGNITUDE = "lora_magnitude_vector"


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r with rank-stabilised LoRA: the one place the scaling formula is written."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraA(nn.Linear):
    """A (r×in), bias-free: x·Aᵀ in x's dtype (the weight is cast, not x), x's flat positions `drop` zeroed if given."""

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        weight = _cast(self.weight, x.dtype)
        return F.linear(x, weight) if drop is None else dropped_linear(x, weight, drop)  # (…, in) -> (…, r)


class LoraB(nn.Linear):
    """B (out×r), bias-free: adds s·(a·Bᵀ) to the base output in place (one `addmm_`), in its dtype."""

    def forward(self, a: torch.Tensor, out: torch.Tensor, scaling: float) -> torch.Tensor:
        return add_low_rank_(out, _cast(a, out.dtype), _cast(self.weight, out.dtype), scaling)  # (…, r) -> (…, out)


class LoraLinear(nn.Module):
    """x ↦ W0·x + s·B·A·dropout(x), with s = α/r (α/√r for rsLoRA).

    The adapter branch computes in the activations' dtype (bf16 under QLoRA), as `torch.autocast` would: A and B
    are cast to it; x is copied only for dropout (and upcast where the CPU lacks native bf16 matmuls: the one-node
    training path computes there in fp32, `lora_ops.math_dtype`). A and B, their gradients and the optimizer
    state stay in `dtype` (fp32 by default), so updates are exact.

    Training over a frozen base (the QLoRA case) runs as one autograd node (`lora_ops.lora_linear`); with DoRA, a
    trainable base, or hooks on these modules (DeepSpeed ZeRO-3 gathers A and B in `lora_A`'s and `lora_B`'s
    hooks), `lora_A` and `lora_B` are called as modules. The two give the same values (tested).

    Args:
        base_layer: the frozen layer; ``nn.Linear``, transformers' ``Conv1D`` (weight stored in×out) or a
            bitsandbytes ``Linear4bit``.
        r: rank of the update.
        alpha: numerator of the scaling.
        dropout: dropout probability on the adapter's input (0 = no dropout module at all).
        use_rslora: use α/√r instead of α/r.
        init: ``"kaiming"`` (A Kaiming-uniform like nn.Linear) or ``"gaussian"`` (A ~ N(0, 1/r)); B is zero.
        dtype: storage dtype of A and B (and of DoRA's m).
        use_dora: add DoRA's magnitude vector ``lora_magnitude_vector`` (see the module docstring).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", dtype: torch.dtype = torch.float32, use_dora: bool = False) -> None:
        super().__init__()
        in_features, out_features = layer_features(base_layer)
        device = _device_of(base_layer)
        self.base_layer = base_layer
        self.lora_A = LoraA(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = LoraB(r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.set_scaling(alpha, use_rslora)
        self.merged = False
        self.disabled = False
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)) \
            if use_dora else None
        self.reset_parameters(init)
        shield_cpu_repack(base_layer)
        self._lazy_dtype = not getattr(base_layer, "compute_type_is_set", True)

    def set_scaling(self, alpha: float, use_rslora: bool = False) -> None:
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scaling = lora_scaling(alpha, self.r, use_rslora)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None:
            self.lora_magnitude_vector.copy_(self.weight_norm(torch.float32))  # m = ‖W0‖ since B = 0

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)  # (…, in) -> (…, out)
        x_in, drop, keep_scale = dropout_plan(self.dropout, x)
        if x_in is x and self._one_node(x):  # y = W0·x + s·B·A·x̃, x̃ = x with `drop` zeroed
            return lora_linear(x, self.base_layer, frozen_dense, self.lora_A.weight, self.lora_B.weight,
                               self.scaling * keep_scale, drop)
        out = self.base_layer(x)  # (…, in) -> (…, out)
        a = self.lora_A(x_in, drop)  # (…, in) -> (…, r): dropout(x)·Aᵀ without dropout's 1/(1-p)
        if self.lora_magnitude_vector is None:
            return self.lora_B(a, out, self.scaling * keep_scale)  # out + s·(a·Bᵀ): (…, r) -> (…, out)
        g = (self.lora_magnitude_vector / self.weight_norm(x.dtype)).to(out.dtype)  # (out,)
        bias = getattr(self.base_layer, "bias", None)
        w0x = out - bias.to(out.dtype) if bias is not None else out  # (…, out)
        lora = F.linear(_cast(a, out.dtype), _cast(self.lora_B.weight, out.dtype))  # (…, r) -> (…, out)
        return out + (g - 1) * w0x + g * lora * (self.scaling * keep_scale)  # = g⊙W0x + g⊙s·BAx + b

    def _one_node(self, x: torch.Tensor) -> bool:
        """Whether this forward can be `lora_linear`: training without DoRA or autocast, a frozen Linear / Conv1D /
        Linear4bit base computing in x's dtype, and no module hooks that calling the submodules would run."""
        base = self.base_layer
        if self.lora_magnitude_vector is not None or not torch.is_grad_enabled() or torch.is_autocast_enabled(
                x.device.type) or not all(_unhooked(m) for m in (base, self.lora_A, self.lora_B)):
            return False
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        if weight is None or weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if is_4bit(base) or (type(base).__name__ in _4BIT and getattr(base, "quant_state", None) is not None):
            # (FSDP2 hands bnb a weight without its state); a compute dtype that bnb sets in the first forward
            # would change this answer between a checkpointed forward and its recompute
            return not self._lazy_dtype and getattr(base, "compute_dtype", None) == x.dtype
        return (type(base) is nn.Linear or is_conv1d(base)) and weight.dtype == x.dtype

    @torch.no_grad()
    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row (out,), in `dtype`, without a gradient (DoRA's constant denominator)."""
        w = dense_weight(self.base_layer, dtype)  # (out, in), dequantized for 4-bit: a temporary
        return torch.linalg.norm(w + self.delta_weight().to(dtype), dim=1)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A, shape (out, in), in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into a 16/32-bit base weight in place; a no-op when already merged."""
        if self.merged:
            return
        self._add_to_base(+1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight; a no-op when not merged."""
        if not self.merged:
            return
        self._add_to_base(-1)
        self.merged = False

    def _add_to_base(self, sign: int) -> None:
        if is_4bit(self.base_layer):
            raise TypeError(
                "LoraLinear.merge() cannot fold an update into 4-bit weights without requantizing them (which loses "
                "the quality the adapter was trained for). Use hf_lowrank.merge(model), which returns a 16-bit copy "
                "with the deltas folded onto the dequantized weights."
            )
        weight = self.base_layer.weight
        conv = is_conv1d(self.base_layer)
        if self.lora_magnitude_vector is not None:  # W' = g ⊙ (W0 + ΔW); back: W0 = W'/g - ΔW
            if sign > 0:
                self._dora_g = (self.lora_magnitude_vector / self.weight_norm(torch.float32)).unsqueeze(1)  # (out, 1)
            w = dense_weight(self.base_layer, torch.float32)
            w = (w + self.delta_weight().float()) * self._dora_g if sign > 0 else w / self._dora_g - \
                self.delta_weight().float()
            weight.copy_((w.T if conv else w).to(weight.dtype))
            return
        delta = self.delta_weight().to(weight.dtype)
        if conv:
            delta = delta.T  # Conv1D stores (in, out)
        weight.add_(sign * delta)

    def extra_repr(self) -> str:
        dora = ", dora=True" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}{dora}, merged={self.merged}, disabled={self.disabled}"


class _Wrapper(nn.Module):
    """A module standing in for another: attributes the model reads through it (`weight`, `out_features`,
    `embed_scale`...) and that it does not have itself are the wrapped module's (`wrapped()`)."""

    _own = ("base_layer", "original", "trainable")

    def wrapped(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # the wrapper's own modules, parameters and buffers
        except AttributeError:
            if name in self._own:
                raise
            return getattr(self.wrapped(), name)


class SavedModule(_Wrapper):
    """A module trained and saved in full (`modules_to_save`, e.g. a new classification head): a trainable copy
    beside the frozen original, so that with adapters disabled the model is exactly the base again.

    The copy's parameters keep the module's own names in adapter files (`lm_head.weight`, as PEFT writes them);
    attributes the model reads through the wrapper (`weight`, `out_features`...) are the active module's.
    """

    def __init__(self, original: nn.Module) -> None:
        import copy

        super().__init__()
        self.original = original
        self.trainable = copy.deepcopy(original)
        for p in self.original.parameters():
            p.requires_grad_(False)
        self.disabled = False

    @property
    def active(self) -> nn.Module:
        return self.original if self.disabled else self.trainable

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)

    def wrapped(self) -> nn.Module:
        return self.active

    def extra_repr(self) -> str:
        return f"disabled={self.disabled}"


#: PEFT's name for the trained rows of an embedding (it holds the rows themselves, not a difference), and their key
#: under the embedding's name in adapter files (PEFT's TrainableTokensWrapper layout).
TOKENS_DELTA = "trainable_tokens_delta"
TOKENS_KEY = "token_adapter." + TOKENS_DELTA


class TrainableTokens(_Wrapper):
    """Trainable rows of a frozen embedding (`trainable_token_indices`, e.g. the rows of newly added tokens).

        E' = E with rows i₁…i_k replaced by R (k×d, initialised to E[i₁…i_k]),   embed(x) = E'[x]

    Only R trains and is saved (k·d values instead of vocab·d for `modules_to_save`); R is stored in the adapter
    dtype and cast to the embedding's output dtype. Rows are looked up through a vocab-sized slot map, so no copy of
    E is made per forward. An embedding that scales its output (`embed_scale`, Gemma) scales R's rows the same way.
    Attributes the model reads through the wrapper (`weight`, `num_embeddings`...) are the frozen embedding's.
    """

    def __init__(self, base_layer: nn.Module, indices: list[int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        weight = base_layer.weight
        self.base_layer = base_layer
        self.token_indices = list(indices)
        index = torch.tensor(self.token_indices, dtype=torch.long, device=weight.device)
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].to(dtype).clone())  # (k, d)
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[index] = torch.arange(len(index), device=weight.device)
        self.register_buffer("slots", slots, persistent=False)  # (vocab,): row of R for a token, -1 for none
        self.register_buffer("index", index, persistent=False)  # (k,)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (…,) -> (…, d)
        if self.disabled:
            return out
        slot = self.slots[x]  # (…,), -1 where the token keeps its frozen row
        rows = F.embedding(slot.clamp(min=0), self.trainable_tokens_delta).to(out.dtype)  # (…, d)
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is not None:
            rows = rows * scale.to(rows.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices}, disabled={self.disabled}"


class TiedTokenHead(_Wrapper):
    """The output head of a model whose head shares the embedding's weight, beside a `TrainableTokens` embedding:
    the logits of the chosen tokens use the trained rows, as a tied head would.

        logits = h·Eᵀ (+ b), with columns i₁…i_k replaced by h·Rᵀ (+ b[i₁…i_k])

    R is the embedding's parameter (saved once, under the embedding's name); the head holds no parameter of its own.
    """

    def __init__(self, base_layer: nn.Module, tokens: TrainableTokens) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["tokens"] = tokens  # not a submodule: its parameter belongs to the embedding

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(h)  # (…, d) -> (…, vocab)
        if self.tokens.disabled:
            return out
        cols = F.linear(h, _cast(self.tokens.trainable_tokens_delta, h.dtype))  # (…, d) -> (…, k)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            cols = cols + bias[self.tokens.index].to(cols.dtype)
        return out.index_copy(-1, self.tokens.index, cols.to(out.dtype))

    def low_rank(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This head's change to the plain logits h·Eᵀ as u·Pᵀ: u = h·(R − E[i₁…i_k])ᵀ (…, k) and P the (vocab, k)
        one-hot columns of the tokens (for chunked heads that read `weight` only); None while disabled."""
        if self.tokens.disabled:
            return None
        weight = self.base_layer.weight
        delta = self.tokens.trainable_tokens_delta.to(h.dtype) - weight[self.tokens.index].to(h.dtype)  # (k, d)
        cols = torch.zeros(weight.shape[0], len(self.tokens.index), dtype=h.dtype, device=h.device)
        cols[self.tokens.index, torch.arange(len(self.tokens.index), device=h.device)] = 1
        return F.linear(h, delta), cols


# ---- dropout on the adapter's input ---------------------------------------------------------------------------------


def dropout_plan(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """How the adapter's input is dropped: (input, flat positions of it to zero or None, the 1/(1-p) factor
    left for the caller to fold into the scaling).

    On CPU, for 0 < p ≤ 0.5, the dropped positions are drawn as geometric gaps between drops (`drop_positions`):
    about n·p random draws instead of bernoulli_'s n, and no n-element mask; they are zeroed in one copy of x, and
    in x's gradient in place (`lora_ops`). Elsewhere (and for larger p) torch's own dropout runs, scaled.
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if p == 0.0:
        return x, None, 1.0
    if p <= 0.5 and x.device.type == "cpu":
        return x, drop_positions(x.numel(), p), 1 / (1 - p)
    return dropout(x), None, 1.0


def dropout_unscaled(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(dropout(x) without its 1/(1-p) factor, that factor): `dropout_plan` with the positions zeroed in a copy."""
    x_in, drop, keep = dropout_plan(dropout, x)
    if drop is not None:
        x_in = zeroed(x, drop)  # (…, in) -> (…, in), one copy
    return x_in, keep


def drop_positions(n: int, p: float) -> torch.Tensor:
    """The True positions of n i.i.d. Bernoulli(p) draws (increasing int64 in [0, n)), from geometric gaps.

    A gap between consecutive drops is Geometric(p) on {1, 2, …}: ⌊log(v)/log(1-p)⌋ + 1 for v uniform in (0, 1],
    with a vectorised log over float32 draws (v on a 2⁻²⁴ grid: each gap's distribution function is off by less
    than 2⁻²⁴). Drawn from torch's default generator, so gradient checkpointing's recompute (which restores the
    RNG state) redraws the same positions.
    """
    chunk = int(n * p + 6 * math.sqrt(n * p) + 16)  # enough draws but for a 6-sigma shortfall
    inv = 1 / math.log1p(-p)

    def gaps() -> torch.Tensor:  # (chunk,) int64 ≥ 1; v = 1 - u for u uniform in [0, 1)
        return torch.rand(chunk).neg_().log1p_().mul_(inv).floor_().add_(1).to(torch.int64)

    ends = gaps().cumsum_(0)  # 1-based positions of the drops
    k = int(torch.searchsorted(ends, n, right=True))  # how many fall in [1, n]
    while k == len(ends):
        ends = torch.cat([ends, gaps().cumsum_(0).add_(ends[-1])])
        k = int(torch.searchsorted(ends, n, right=True))
    return ends[:k].sub_(1)


# ---- what kind of linear layer a module is --------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


_4BIT = frozenset({"Linear4bit", "LinearNF4", "LinearFP4"})


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (its weight carries a `quant_state`)."""
    return hasattr(getattr(module, "weight", None), "quant_state") and type(module).__name__ in _4BIT


def is_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not isinstance(module, (LoraA, LoraB))) or is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Linear4bit or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a dense (out, in) tensor: dequantized for Linear4bit, transposed for Conv1D."""
    return _dense(module.weight, is_4bit(module), is_conv1d(module), dtype)


def frozen_dense(module: nn.Module):
    """`dense_weight(module, dtype)` as a function of the dtype, bound to the weight `module` holds now."""
    return functools.partial(_dense, module.weight, is_4bit(module), is_conv1d(module))


def _dense(weight: torch.Tensor, four_bit: bool, conv1d: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    if four_bit:
        import bitsandbytes.functional as bnbf
        w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    else:
        w = weight.detach().T if conv1d else weight.detach()
    return w.to(dtype) if dtype is not None else w


def _unhooked(module: nn.Module) -> bool:
    """No forward or backward hooks on `module`, and no accelerate hook (which may move its weight in and out)."""
    return not (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or hasattr(module, "_hf_hook"))


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
