"""LoraLinear: the math, the gradients, scaling, dropout, merge, and the 4-bit base."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_lowrank import LoraLinear

torch.manual_seed(0)


def _random_adapter(layer: LoraLinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g))
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))


def test_zero_init_output_equals_base():
    base = nn.Linear(64, 128)
    layer = LoraLinear(base, r=8, alpha=16)
    x = torch.randn(3, 5, 64)
    assert torch.count_nonzero(layer.lora_A.weight) > 0, "A must be randomly initialised"
    assert torch.count_nonzero(layer.lora_B.weight) == 0, "B must start at zero"
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_forward_equals_formula_and_shapes():
    base = nn.Linear(64, 128, bias=True)
    layer = LoraLinear(base, r=4, alpha=12)
    _random_adapter(layer)
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (128, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    x = torch.randn(2, 7, 64)
    A, B, W0, b = layer.lora_A.weight, layer.lora_B.weight, base.weight, base.bias
    expected = x @ W0.T + b + (12 / 4) * (x @ A.T @ B.T)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - base(x)).abs().max() > 1e-2, "the adapter must change the output"


def test_gradients_match_closed_form():
    """g_B = s·g_ΔW·Aᵀ, g_A = s·Bᵀ·g_ΔW with g_ΔW = Gᵀx; the base gets no gradient."""
    base = nn.Linear(64, 64, bias=False)
    base.weight.requires_grad_(False)
    layer = LoraLinear(base, r=8, alpha=16)
    _random_adapter(layer)
    s = layer.scaling
    x = torch.randn(10, 64, dtype=torch.float32)
    G = torch.randn(10, 64)
    layer(x).backward(G)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    g_dW = G.T @ x  # (out, in)
    torch.testing.assert_close(layer.lora_B.weight.grad, s * g_dW @ A.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * B.T @ g_dW, rtol=1e-4, atol=1e-4)
    assert base.weight.grad is None
    assert layer.lora_A.weight.grad.abs().max() > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(rslora):
    layer = LoraLinear(nn.Linear(64, 64), r=16, alpha=32, use_rslora=rslora)
    assert layer.scaling == pytest.approx(32 / math.sqrt(16) if rslora else 32 / 16)
    assert layer.scaling == pytest.approx(8.0 if rslora else 2.0)


def test_dropout_only_in_training():
    base = nn.Linear(64, 64)
    layer = LoraLinear(base, r=8, alpha=16, dropout=0.5)
    _random_adapter(layer)
    x = torch.randn(4, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    assert (a - b).abs().max() > 1e-3, "dropout must be active in training"
    assert isinstance(LoraLinear(base, r=8, alpha=16, dropout=0.0).dropout, nn.Identity)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3])
def test_dropout_output_and_gradients_equal_the_masked_formula(dtype, tol, p):
    """y = W0·x + b + s·B·A·(x⊙keep)/(1-p), keep the mask drawn from the same generator state; the output and the
    gradients of x, A and B equal autograd's through that plain formula (in fp32; bf16 to a relative 2e-2), and
    under non-reentrant checkpointing (whose recompute redraws the mask) the gradients are bitwise the same."""
    from conftest import drop_mask
    from torch.utils.checkpoint import checkpoint

    base = nn.Linear(96, 80).to(dtype).requires_grad_(False)
    layer = LoraLinear(base, r=8, alpha=16, dropout=p).train()
    _random_adapter(layer)
    x0 = torch.randn(3, 40, 96).to(dtype)
    G = torch.randn(3, 40, 80).to(dtype)

    def run(checkpointed: bool):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        y.backward(G)
        return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

    got = run(False)
    torch.manual_seed(7)
    keep = ~drop_mask(x0.numel(), p).view(x0.shape) if p else torch.ones_like(x0, dtype=torch.bool)
    assert p == 0 or 0 < (~keep).sum() < keep.sum()
    x = x0.float().clone().requires_grad_(True)
    A, B = (w.detach().clone().requires_grad_(True) for w in (layer.lora_A.weight, layer.lora_B.weight))
    ref = x @ base.weight.float().T + base.bias.float() + layer.scaling * ((x * keep / (1 - p)) @ A.T @ B.T)
    ref.backward(G.float())
    for name, g, r in zip(("y", "x", "A", "B"), got, (ref.detach(), x.grad, A.grad, B.grad), strict=True):
        assert g.dtype == (dtype if name in "yx" else torch.float32), name
        err = ((g.float() - r).abs().max() / r.abs().max()).item()
        assert err < tol, (name, err)
    no_drop = x0.float() @ base.weight.float().T + base.bias.float() + layer.scaling * (x0.float() @ A.T @ B.T)
    assert p == 0 or (no_drop - ref).abs().max() > 10 * tol * ref.abs().max(), "the mask must matter"
    base_only = (G.float() @ base.weight.float())[~keep]  # where x was dropped, only the base layer's ∂x
    assert p == 0 or (got[1].float()[~keep] - base_only).abs().max() < tol * got[1].abs().max()
    for g, c in zip(got, run(True), strict=True):
        assert torch.equal(g, c), "checkpointing's recompute must redraw the same mask"


@pytest.mark.parametrize("layout", ["contiguous", "strided", "view"])
def test_add_low_rank_in_place_and_its_gradients(layout):
    """out + s·a·Bᵀ, written into `out` (same storage) when it is contiguous and not a view; the gradients of out,
    a and B are autograd's through the out-of-place formula. A base whose backward needs its own output cannot be
    summed into in place: autograd refuses loudly instead of differentiating a modified tensor."""
    from hf_lowrank.lora_ops import add_low_rank_

    torch.manual_seed(0)
    x = torch.randn(2, 6, 12, requires_grad=True)
    a = torch.randn(2, 6, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    G = torch.randn(2, 6, 10)
    lin = torch.randn(12, 10)
    out = x @ lin  # (2, 6, 10)
    if layout == "strided":
        out = out.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "view":
        out = (x.reshape(12, 12) @ lin).view(2, 6, 10)
    assert out.is_contiguous() == (layout != "strided") and (out._base is None) == (layout == "contiguous")
    ptr = out.data_ptr()
    y = add_low_rank_(out, a, w, 0.5)
    assert (y.data_ptr() == ptr) == (layout == "contiguous")
    y.backward(G)
    got = [t.grad.clone() for t in (x, a, w)]
    for t in (x, a, w):
        t.grad = None
    ref = x @ lin + 0.5 * (a @ w.T)
    torch.testing.assert_close(y, ref)
    ref.backward(G)
    for g, t in zip(got, (x, a, w), strict=True):
        torch.testing.assert_close(g, t.grad)
        assert t.grad.abs().max() > 0
    saved_own_output = torch.exp(x[..., :10])  # exp's backward reads its result
    with pytest.raises(RuntimeError, match="inplace"):
        add_low_rank_(saved_own_output, a, w, 0.5).sum().backward()


def test_merge_unmerge_idempotent_linear():
    base = nn.Linear(64, 128)
    layer = LoraLinear(base, r=8, alpha=16)
    _random_adapter(layer)
    x = torch.randn(3, 64)
    before = layer(x)
    w0 = base.weight.detach().clone()
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_conv1d_base_formula_and_merge():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(nf=192, nx=64)  # weight (in=64, out=192)
    torch.nn.init.normal_(base.weight, std=0.02)
    layer = LoraLinear(base, r=4, alpha=8)
    _random_adapter(layer)
    assert (layer.in_features, layer.out_features) == (64, 192)
    x = torch.randn(2, 5, 64)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_disabled_flag_gives_base_output():
    base = nn.Linear(64, 64)
    layer = LoraLinear(base, r=8, alpha=16)
    _random_adapter(layer)
    x = torch.randn(2, 64)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))


def _quantized(in_f: int, out_f: int, seed: int = 0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=False)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                          compress_statistics=True)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")
    if getattr(q.weight, "quant_state", None) is None:  # CPU: quantize explicitly as transformers does
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
    return q


def test_4bit_parity_with_dequantized_linear():
    from hf_lowrank.layers import dense_weight

    q = _quantized(128, 192)
    assert q.weight.quant_state is not None and q.weight.quant_state.quant_type == "nf4"
    w = dense_weight(q, torch.float32)
    assert w.shape == (192, 128)
    plain = nn.Linear(128, 192, bias=False)
    with torch.no_grad():
        plain.weight.copy_(w)
    a, b = LoraLinear(q, r=8, alpha=16), LoraLinear(plain, r=8, alpha=16)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora" in k}, strict=False)
    _random_adapter(a)
    _random_adapter(b)
    x = torch.randn(4, 128)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-3, atol=1e-3)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(a.lora_A.weight.grad, b.lora_A.weight.grad, rtol=1e-3, atol=1e-3)


def test_4bit_eval_forward_mid_training_keeps_gradients():
    """bitsandbytes 0.50's CPU repack on an eval forward must never happen under our layers."""
    torch.manual_seed(0)
    first, second = LoraLinear(_quantized(128, 128, 1), r=8, alpha=16), LoraLinear(_quantized(128, 128, 2), r=8,
                                                                                   alpha=16)
    _random_adapter(first, 3)
    _random_adapter(second, 4)
    net = nn.Sequential(first, second)
    x = torch.randn(4, 128)
    net(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        net(x)
    net.train()
    net(x).pow(2).sum().backward()
    after = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in after)
    for g0, g1 in zip(grads, after, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-5)
    assert not getattr(first.base_layer.weight.quant_state, "packing_format_for_cpu", False)


def test_4bit_odd_out_features_evaluate():
    layer = LoraLinear(_quantized(128, 72), r=4, alpha=8).eval()  # 72 is not a multiple of 32
    with torch.no_grad():
        y = layer(torch.randn(2, 128))
    assert y.shape == (2, 72) and torch.isfinite(y).all()


def test_4bit_merge_in_place_refused():
    layer = LoraLinear(_quantized(128, 128), r=4, alpha=8)
    with pytest.raises(TypeError, match="hf_lowrank.merge"):
        layer.merge()
