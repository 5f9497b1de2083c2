"""The adapter branch's two autograd ops, written out so that neither makes a copy autograd would otherwise make.

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
"""

from __future__ import annotations

import torch


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        x_in = x.reshape(-1).index_fill(0, drop, 0).view(x.shape)  # (…, in), one copy
        ctx.save_for_backward(x_in, weight, drop)
        return torch.matmul(x_in, weight.T)  # (…, in) -> (…, r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
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
        return torch.addmm(out.reshape(-1, out.shape[-1]), a2, weight.T, alpha=scaling).view(out.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_a = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_a = (g2 @ weight).mul_(ctx.scaling).view(ctx.a_shape)  # (N, out)·(out, r)
        if ctx.needs_input_grad[2]:
            grad_w = (g2.T @ a2).mul_(ctx.scaling)  # (out, N)·(N, r)
        return grad, grad_a, grad_w, None


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """(x with the flat positions `drop` zeroed)·weightᵀ; x and weight in one dtype."""
    return _DroppedLinear.apply(x, weight, drop)


def add_low_rank_(out: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """out + scaling·a·weightᵀ, written into `out` when it is contiguous and not a view; all three in one dtype."""
    return _AddLowRank.apply(out, a, weight, scaling)
