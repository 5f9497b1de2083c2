"""`LoraLinear`: a frozen linear layer plus a trainable low-rank update.

          x (…, in)
          ├───────────────► base_layer: W0 (out×in), frozen; nn.Linear, GPT-2's Conv1D or bnb Linear4bit (NF4)
          └─ dropout ─► A (r×in, Kaiming-uniform) ─► B (out×r, zeros) ─► × α/r
                                                                          ▼
          y = W0·x + (α/r)·B·A·x                                          +

B starts at zero, so a fresh adapter leaves the base output unchanged; gradients reach only A and B:
g_B = (α/r)·g_ΔW·Aᵀ and g_A = (α/r)·Bᵀ·g_ΔW, where g_ΔW = Gᵀx for an upstream gradient G.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module  # the global forward hooks live there


class LoraLinear(nn.Module):
    """x ↦ W0·x + s·B·A·dropout(x), with s = α/r (α/√r for rsLoRA).

    Args:
        base_layer: the frozen layer; ``nn.Linear``, transformers' ``Conv1D`` (weight stored in×out) or a
            bitsandbytes ``Linear4bit``.
        r: rank of the update.
        alpha: numerator of the scaling.
        dropout: dropout probability on the adapter's input (0 = no dropout module at all).
        use_rslora: use α/√r instead of α/r.
        init: ``"kaiming"`` (A Kaiming-uniform like nn.Linear) or ``"gaussian"`` (A ~ N(0, 1/r)); B is zero.
        dtype: dtype of A and B; the adapter branch computes in it and casts its result to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        in_features, out_features = layer_features(base_layer)
        device = _device_of(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.disabled = False
        self.reset_parameters(init)
        if _is_4bit(base_layer):
            # bitsandbytes 0.50 on CPUs with avx512_bf16 repacks the weight in place on the first eval-mode forward
            # without grad, after which matmul_4bit no longer propagates gradients to its input (adapters upstream
            # silently stop training) and out_features not divisible by 32 crash. Never take that path.
            base_layer.support_avx512bf16_for_cpu = False

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (…, in) -> (…, out)
        if self.disabled or self.merged:
            return out
        if self._hooked():
            # DeepSpeed ZeRO-3 gathers A and B only when their own modules are called (hooks on lora_A / lora_B).
            a = self.lora_A(_cast(self.dropout(x), self.lora_A.weight.dtype))  # (…, in) -> (…, r)
            return out + _cast(self.lora_B(a) * self.scaling, out.dtype)  # (…, r) -> (…, out)
        # The adapter computes in the activations' dtype (bf16 under QLoRA): its small weights are cast, never the
        # (…, in) input, so no copy of x is made or kept for backward; gradients reach the fp32 weights through the
        # cast and the optimizer updates them in fp32 (what torch.autocast does to an fp32 LoRA under bf16).
        x_in, scaling = self._dropout(x)
        a = F.linear(x_in, _cast(self.lora_A.weight, x.dtype))  # (…, in) -> (…, r)
        # out + s·(a·Bᵀ) in one addmm: no (…, out) temporaries for the product and its scaling.
        y = torch.addmm(out.reshape(-1, out.shape[-1]), _cast(a, out.dtype).reshape(-1, a.shape[-1]),
                        _cast(self.lora_B.weight, out.dtype).T, alpha=scaling)  # (N, r) -> (N, out)
        return y.view(out.shape)

    def _dropout(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(dropout(x) up to its 1/(1-p) factor, the scaling that factor is folded into).

        On CPU, for p ≤ 0.5, the dropped positions are drawn as geometric gaps between drops: about n·p random
        draws instead of bernoulli_'s n (the RNG is a fifth of a CPU training step otherwise), the same i.i.d.
        Bernoulli(p) mask, drawn from the default generator, so checkpointing's recompute redraws the same one.
        """
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0
        if 0.0 < p <= 0.5 and x.device.type == "cpu":
            return x.masked_fill(_drop_mask(x.numel(), p).view(x.shape), 0), self.scaling / (1 - p)
        return self.dropout(x), self.scaling

    def _hooked(self) -> bool:
        """Whether calling lora_A / lora_B does more than the matmul (ZeRO-3 parameter gathering, user hooks)."""
        m = _torch_module
        return bool(self.lora_A._forward_pre_hooks or self.lora_B._forward_pre_hooks or self.lora_A._forward_hooks
                    or self.lora_B._forward_hooks or m._global_forward_pre_hooks or m._global_forward_hooks)

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
        if _is_4bit(self.base_layer):
            raise TypeError(
                "LoraLinear.merge() cannot fold an update into 4-bit weights without requantizing them (which loses "
                "the quality the adapter was trained for). Use hf_lowrank.merge(model), which returns a 16-bit copy "
                "with the deltas folded onto the dequantized weights."
            )
        weight = self.base_layer.weight
        delta = self.delta_weight().to(weight.dtype)
        if is_conv1d(self.base_layer):
            delta = delta.T  # Conv1D stores (in, out)
        weight.add_(sign * delta)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}, disabled={self.disabled}"


def _drop_mask(n: int, p: float) -> torch.Tensor:
    """n i.i.d. Bernoulli(p) booleans (True = drop), from geometric gaps between consecutive drops."""
    chunk = int(n * p + 6 * math.sqrt(n * p) + 16)  # enough draws but for a 6-sigma shortfall
    ends = torch.empty(chunk, dtype=torch.float64).geometric_(p).cumsum_(0)  # 1-based positions of the drops
    while ends[-1] <= n:
        more = torch.empty(chunk, dtype=torch.float64).geometric_(p).cumsum_(0).add_(ends[-1])
        ends = torch.cat([ends, more])
    drop = torch.zeros(n, dtype=torch.bool)
    drop[ends[ends <= n].long() - 1] = True
    return drop


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; the tensor itself (no copy) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_4bit(module: nn.Module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state") and type(module).__name__ in {
        "Linear4bit", "LinearNF4", "LinearFP4"}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Linear4bit or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a dense (out, in) tensor: dequantized for Linear4bit, transposed for Conv1D."""
    if _is_4bit(module):
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    elif is_conv1d(module):
        w = module.weight.detach().T
    else:
        w = module.weight.detach()
    return w.to(dtype) if dtype is not None else w


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
