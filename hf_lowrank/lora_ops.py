"""The adapter's autograd ops, written out so that none makes a copy autograd would otherwise make.

    lora_linear(x, base, dense, A, B, s, drop)
                                      y = base(x) + s·(x̃·Aᵀ)·Bᵀ, a frozen base, one autograd node   (…, in) -> (…, out)
                                      ∂x = ∂a·A zeroed at `drop`, + g·W0 (one addmm_),   ∂A = ∂aᵀ·x̃,   ∂B = s·gᵀ·a,
                                      ∂a = s·g·B
    dropped_linear(x, A, drop)        a = x̃·Aᵀ,  x̃ = x with the flat positions `drop` zeroed   (…, in) -> (…, r)
                                      ∂x = (∂a·A) zeroed at `drop` (in place),   ∂A = ∂aᵀ·x̃
    add_low_rank_(out, a, B, s)       out += s·a·Bᵀ, in place                                  (…, r) -> (…, out)
                                      ∂out = g,   ∂a = s·g·B,   ∂B = s·gᵀ·a

Against the same formulas through stock autograd ops (`index_fill`, `F.linear`, `addmm`): no gradient copy for the
dropout's backward (∂x is fresh from the matmul, so it is zeroed in place, and it is not a view, so autograd can
add the base layer's ∂x into it), and no (…, out) copy of the base output for the sum (`addmm` writes a new tensor).
On CPU those copies were fresh allocations of (tokens × 1408) activations: page faults, not arithmetic, were
most of what they cost. `out` (unless it is a view) is modified in place: the base layers LoraLinear wraps
(nn.Linear, Conv1D, bitsandbytes Linear4bit) do not keep their output for backward (autograd would raise if one
did).

`lora_linear` is the training path of a LoRA layer over a frozen base (`LoraLinear` decides when it applies; the two
ops below are the rest). Against them and the base's own autograd node, per call: one node instead of three (on CPU
each costs Python time that a 128-token step notices), and one (…, in) gradient instead of two plus their sum (the
base's g·W0 is accumulated into the adapter's part in place). Its saved tensors are packed before the base layer
runs, so that in a block under non-reentrant gradient checkpointing the recompute stops before the block's last base
matmul (down_proj), as it does for the frozen model: checkpointing counts packed tensors, and bitsandbytes' 4-bit
matmul packs none. It frees what it packed when its backward runs (unless the graph is retained), as autograd does.

The products of `lora_linear` run in x's dtype, or in fp32 where this CPU has no native bf16 / fp16 matmul
(`math_dtype`): there torch's fallback kernel made each rank-16 product of a 512-token step cost 1–30 ms.

The backwards are first-order: one with `create_graph=True` (grad mode on in the backward) raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .compat import graph_kept, native_half_matmul, saved_tensors_hooks


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        x_in = zeroed(x, drop)  # (…, in), one copy
        ctx.save_for_backward(x_in, weight, drop)
        return torch.matmul(x_in, weight.T)  # (…, in) -> (…, r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _first_order()
        x_in, weight, drop = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, weight).contiguous()  # (…, r) -> (…, in), a fresh tensor
            grad_x.view(-1).index_fill_(0, drop, 0)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x_in.reshape(-1, x_in.shape[-1])  # (r, N)·(N, in)
        return grad_x, grad_w, None


class _AddLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
        a2 = a.reshape(-1, a.shape[-1])  # (N, r)
        ctx.save_for_backward(a2, weight)
        ctx.scaling, ctx.a_shape = scaling, a.shape
        if out.is_contiguous() and out._base is None:  # not a view (autograd forbids some views' in-place changes)
            out.view(-1, out.shape[-1]).addmm_(a2, weight.T, alpha=scaling)  # (N, out) += s·(N, r)·(r, out)
            ctx.mark_dirty(out)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), a2, weight.T, alpha=scaling).view(out.shape).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _first_order()
        a2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_a = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_a = (g2 @ weight).mul_(ctx.scaling).view(ctx.a_shape)  # (N, out)·(out, r)
        if ctx.needs_input_grad[2]:
            grad_w = _weight_grad(a2, g2, ctx.scaling, weight.dtype)  # s·gᵀ·a, (out, r)
        return grad, grad_a, grad_w, None


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_a, weight_b, base, dense, scaling, drop):
        md = math_dtype(x)  # the rank-r products' dtype: x's, or fp32 (see `math_dtype`)
        wa, wb = weight_a.to(md), weight_b.to(md)  # (r, in), (out, r)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), kept in x's dtype
        if drop is not None:
            x2 = zeroed(x2, drop)  # one copy
        a = cast(x2, md) @ wa.T  # (N, in) -> (N, r)
        _save_now(ctx, x2, a, wa, wb, drop)  # before the base: see the module docstring
        out = base(x)  # (…, in) -> (…, out); no graph (grad mode is off in here)
        ctx.dense = dense(base)  # the weight the base used (bitsandbytes may re-wrap it in its forward)
        if not out.is_contiguous():
            out = out.contiguous()
        out2 = out.view(-1, out.shape[-1])  # (N, out)
        if md == out.dtype:
            out2.addmm_(a, wb.T, alpha=scaling)  # += s·(N, r)·(r, out)
        else:  # the sum in fp32, rounded once
            out2.copy_(out2.to(md).addmm_(a, wb.T, alpha=scaling))
        ctx.scaling, ctx.x_shape, ctx.dtypes = scaling, x.shape, (weight_a.dtype, weight_b.dtype)
        return out if out._base is None else out.detach()  # not a view: the caller may change it in place

    @staticmethod
    def backward(ctx, grad):
        _first_order()
        x2, a, wa, wb, drop = _saved(ctx)
        md = a.dtype  # the products' dtype
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gm = cast(g2, md)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        # ∂a first, while g is cold (it reads g); ∂B after it then reads g from cache
        ga = (gm @ wb).mul_(ctx.scaling) if need_x or need_a else None  # (N, out)·(out, r) -> (N, r)
        if need_b:
            grad_b = _weight_grad(a, gm, ctx.scaling, ctx.dtypes[1])  # s·gᵀ·a, (out, r)
        if need_a:
            grad_a = (ga.T @ cast(x2, md)).to(ctx.dtypes[0])  # (r, N)·(N, in)
        if need_x:
            grad_x = ga @ wa  # (N, r)·(r, in): the adapter's part of ∂x, a fresh tensor
            if drop is not None:
                grad_x.view(-1).index_fill_(0, drop, 0)
            grad_x = cast(grad_x, grad.dtype)
            grad_x.addmm_(g2, ctx.dense(grad.dtype))  # += the base's: (N, out)·(out, in)
            grad_x = grad_x.view(ctx.x_shape)
        if not graph_kept():  # freed as autograd frees what save_for_backward saved
            ctx.packed = ctx.dense = None
        return grad_x, grad_a, grad_b, None, None, None, None


def _weight_grad(a: torch.Tensor, g: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """∂B = s·gᵀ·a as a contiguous (out, r) tensor in `dtype`, from a (N, r) and g (N, out): computed as (aᵀ·g)ᵀ,
    which oneDNN ran 5-20% faster than gᵀ·a in a warm loop on an AMX CPU (an r-row product over g rather than an
    out-row one), then transposed back in the one copy that casts it."""
    return (a.T @ g).mul_(scaling).T.to(dtype, memory_format=torch.contiguous_format)  # (r, N)·(N, out) -> (out, r)


def math_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of `lora_linear`'s rank-r products for input x: x's own, except bf16 / fp16 on a CPU that has no
    native matmul for it (`compat.native_half_matmul`), where they run in fp32: x (saved in its own dtype) and the
    incoming gradient are upcast where used, A and B are used in fp32 (upcast if stored in 16 bits), and the
    adapter's part is added to the base's output in fp32 and rounded once."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not native_half_matmul(x.dtype):
        return torch.float32
    return x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; the tensor itself (no copy) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _first_order() -> None:
    """Refuse a backward that builds a graph (`create_graph=True`): the gradients here are written as plain tensor
    ops over values saved without one, so a gradient of them would leave out terms, silently."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "hf_lowrank's LoRA layers compute first-order gradients only: a backward with create_graph=True (a "
            "gradient penalty, a Hessian-vector product) is not supported through them.")


def _save_now(ctx, *tensors) -> None:
    """Save `tensors` for backward now, through the saved-tensor hooks in effect (what `save_for_backward` does when
    the forward returns), or with `save_for_backward` when there are none."""
    hooks = saved_tensors_hooks()
    ctx.unpack = None if hooks is None else hooks[1]
    if hooks is None:
        ctx.save_for_backward(*tensors)
    else:
        ctx.packed = tuple(None if t is None else hooks[0](t) for t in tensors)


def _saved(ctx) -> tuple:
    if ctx.unpack is None:
        return ctx.saved_tensors
    if ctx.packed is None:  # autograd's own words for its saved tensors
        raise RuntimeError(
            "Trying to backward through the graph a second time (or directly access saved tensors after they have "
            "already been freed). Saved intermediate values of the graph are freed when you call .backward() or "
            "autograd.grad(). Specify retain_graph=True if you need to backward through the graph a second time.")
    return tuple(None if p is None else ctx.unpack(p) for p in ctx.packed)


def lora_linear(x: torch.Tensor, base: torch.nn.Module,
                dense: Callable[[torch.nn.Module], Callable[[torch.dtype], torch.Tensor]],
                weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float,
                drop: torch.Tensor | None) -> torch.Tensor:
    """base(x) + scaling·(x̃·Aᵀ)·Bᵀ, x̃ = x with the flat positions `drop` zeroed, as one autograd node.

    `base` must be frozen and return x's dtype; `dense(base)`, called after the base's forward, returns a function
    of a dtype giving the base's weight as a dense (out, in) tensor for ∂x (called in the backward). A and B may be
    stored in another dtype than x (they are cast to `math_dtype(x)`; their gradients come back in their own dtype).
    """
    return _LoraLinear.apply(x, weight_a, weight_b, base, dense, scaling, drop)


def zeroed(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """A copy of x with its flat positions `drop` set to zero (dropout's masked input, unscaled)."""
    return x.reshape(-1).index_fill(0, drop, 0).view(x.shape)


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """(x with the flat positions `drop` zeroed)·weightᵀ; x and weight in one dtype."""
    return _DroppedLinear.apply(x, weight, drop)


def add_low_rank_(out: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """out + scaling·a·weightᵀ, written into `out` when it is contiguous and not a view; all three in one dtype."""
    return _AddLowRank.apply(out, a, weight, scaling)
