"""`lora_ops.lora_linear`, a LoRA layer's training path over a frozen base as one autograd node: the same values as
the per-module path, when it is taken, and that gradient checkpointing's recompute stops before a block's last base
layer with it, as it does for the frozen model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_lowrank import LoraLinear
from hf_lowrank.compat import saved_tensors_hooks

ONE_NODE = "_LoraLinearBackward"


def _base(kind: str, in_f: int = 128, out_f: int = 192, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind.startswith("nf4"):
        import bitsandbytes as bnb

        dtype = torch.bfloat16 if kind == "nf4-bf16" else torch.float32
        dense = nn.Linear(in_f, out_f, bias=False)
        q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
        return q
    if kind.startswith("conv1d"):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_f, in_f)
        nn.init.normal_(layer.weight, std=0.05)
        nn.init.normal_(layer.bias, std=0.05)
    else:
        layer = nn.Linear(in_f, out_f, bias=True)
    return layer.to(torch.bfloat16 if kind.endswith("bf16") else torch.float32).requires_grad_(False)


def _layer(kind: str, p: float) -> LoraLinear:
    layer = LoraLinear(_base(kind), r=8, alpha=16, dropout=p).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return layer


def _dtype(kind: str) -> torch.dtype:
    return torch.bfloat16 if kind.endswith("bf16") else torch.float32


def _run(layer: LoraLinear, x0: torch.Tensor, G: torch.Tensor, mode: str):
    """(y, ∂x, ∂A, ∂B, the output's grad_fn name) of one forward + backward from a fixed generator state."""
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(7)
    if mode == "checkpoint":
        y = checkpoint(layer, x, use_reentrant=False)
    elif mode == "hooks":  # other saved-tensor hooks (offloading-like): every packed tensor is unpacked once
        counts = {"pack": 0, "unpack": 0}

        def pack(t):
            counts["pack"] += 1
            return t.clone()

        def unpack(t):
            counts["unpack"] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = layer(x)
    else:
        y = layer(x)
    name = type(y.grad_fn).__name__
    y.backward(G)
    if mode == "hooks":
        assert counts["pack"] > 0 and counts["pack"] == counts["unpack"], counts
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, name


def _force_per_module(layer: LoraLinear):
    """A no-op hook on lora_A (what DeepSpeed ZeRO-3 installs): the layer must call its submodules."""
    return layer.lora_A.register_forward_pre_hook(lambda module, args: None)


@pytest.mark.parametrize("kind", ["linear-fp32", "linear-bf16", "conv1d-fp32", "nf4-bf16", "nf4-fp32"])
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["plain", "checkpoint", "hooks"])
@pytest.mark.parametrize("native", [True, False], ids=["native-half-matmul", "no-native-half-matmul"])
def test_one_node_equals_the_per_module_path(monkeypatch, kind, p, mode, native):
    """Output and the gradients of x, A and B equal the per-module path's: fp32 to 1e-5 of the largest entry, bf16
    to 1e-2 (∂x sums the base's and the adapter's parts in one addmm_ instead of two roundings; on a CPU without
    native bf16 matmuls the one-node products run in fp32, the per-module path's in bf16); A's and B's gradients
    come back in their fp32 storage dtype. The checkpointed run equals the plain one bitwise. Either answer of
    the CPU probe is tested, whichever CPU runs the test."""
    from hf_lowrank import lora_ops

    monkeypatch.setattr(lora_ops, "native_half_matmul", lambda dtype: native)
    layer = _layer(kind, p)
    dtype = _dtype(kind)
    x0 = torch.randn(3, 40, 128).to(dtype)
    G = torch.randn(3, 40, 192).to(dtype)
    got = _run(layer, x0, G, mode)
    handle = _force_per_module(layer)
    ref = _run(layer, x0, G, mode)
    handle.remove()
    assert got[4] == ONE_NODE and ref[4] != ONE_NODE, (got[4], ref[4])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, r in zip(("y", "x", "A", "B"), got[:4], ref[:4], strict=True):
        assert g.dtype == r.dtype == (dtype if name in "yx" else torch.float32), name
        assert r.abs().max() > 0, name
        err = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
        assert err < tol, (name, err)
    with torch.no_grad():
        layer.disabled = True
        base_y = layer(x0)
        layer.disabled = False
    assert (got[0].float() - base_y.float()).abs().max() > 1e-2 * base_y.float().abs().max(), "the adapter matters"
    if mode == "checkpoint":
        plain = _run(layer, x0, G, "plain")
        for g, c in zip(got[:4], plain[:4], strict=True):
            assert torch.equal(g, c)


def test_when_the_one_node_path_is_taken():
    """Only for training over a frozen base computing in x's dtype, with no hooks on the layer's modules; the other
    cases keep the per-module path (and a trainable base gets its gradient)."""
    x32, x16 = torch.randn(2, 5, 128), torch.randn(2, 5, 128).to(torch.bfloat16)

    def node(layer, x):
        return type(layer(x.clone().requires_grad_(True)).grad_fn).__name__

    assert node(_layer("linear-fp32", 0.0), x32) == ONE_NODE
    trainable = _layer("linear-fp32", 0.0)
    trainable.base_layer.weight.requires_grad_(True)
    assert node(trainable, x32) != ONE_NODE
    trainable(x32).sum().backward()
    assert trainable.base_layer.weight.grad is not None and trainable.base_layer.weight.grad.abs().max() > 0
    assert node(_layer("nf4-bf16", 0.0), x32) != ONE_NODE  # fp32 activations into a bf16-compute 4-bit layer
    assert node(_layer("nf4-bf16", 0.0), x16) == ONE_NODE
    dora = LoraLinear(_base("linear-fp32"), r=8, alpha=16, use_dora=True).train()
    assert node(dora, x32) != ONE_NODE
    hooked = _layer("linear-fp32", 0.0)
    hooked.base_layer.register_forward_hook(lambda module, args, out: None)
    assert node(hooked, x32) != ONE_NODE
    backward_hooked = _layer("linear-fp32", 0.0)
    backward_hooked.lora_B.register_full_backward_hook(lambda module, gin, gout: None)
    assert node(backward_hooked, x32) != ONE_NODE
    with torch.no_grad():
        assert _layer("linear-fp32", 0.0)(x32).grad_fn is None
    if torch.cuda.is_available():  # off CPU, dropout > 0 is torch's own (its mask is not positions)
        assert node(_layer("linear-fp32", 0.1).cuda(), x32.cuda()) != ONE_NODE


def _gemm_4bit_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::gemm_4bit")


def test_checkpoint_recompute_stops_before_the_last_base_matmul():
    """A checkpointed block of two 4-bit LoRA layers (silu between): its recompute runs the first base matmul and
    stops before the second, as it does with the adapters disabled (bitsandbytes packs nothing for checkpointing);
    the per-module path packs the B side after the base, so its recompute runs both."""
    first, second = _layer("nf4-bf16", 0.05), LoraLinear(_base("nf4-bf16", 192, 128, 2), r=8, alpha=16,
                                                         dropout=0.05).train()
    block = nn.Sequential(first, nn.SiLU(), second)
    x0 = torch.randn(2, 64, 128).to(torch.bfloat16)

    def step():
        x = x0.clone().requires_grad_(True)
        y = checkpoint(block, x, use_reentrant=False)
        y.float().pow(2).sum().backward()
        return x.grad

    def disabled_step():
        for m in (first, second):
            m.disabled = True
        try:
            return step()
        finally:
            for m in (first, second):
                m.disabled = False

    one_node = _gemm_4bit_calls(step)
    floor = _gemm_4bit_calls(disabled_step)
    handles = [_force_per_module(m) for m in (first, second)]
    per_module = _gemm_4bit_calls(step)
    for h in handles:
        h.remove()
    assert floor == 3, floor  # two in the forward, one in the recompute
    assert one_node == floor and per_module == 4, (one_node, floor, per_module)
    assert first.lora_A.weight.grad is not None and second.lora_B.weight.grad.abs().max() > 0


def test_saved_tensors_hooks_getter():
    """compat.saved_tensors_hooks: the innermost pair in effect, None outside any or while they are disabled."""
    assert saved_tensors_hooks() is None

    def pack(t):
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        assert saved_tensors_hooks() == (pack, unpack)
    assert saved_tensors_hooks() is None
    with torch.autograd.graph.disable_saved_tensors_hooks("off"):
        assert saved_tensors_hooks() is None
        layer = _layer("linear-fp32", 0.0)  # disabled hooks, none pushed: saved the usual way
        layer(torch.randn(2, 128, requires_grad=True)).sum().backward()
        assert layer.lora_A.weight.grad.abs().max() > 0


def _lazy_nf4(seed: int = 0) -> nn.Module:
    """A 4-bit layer built without a compute dtype: bitsandbytes sets it from x in its first forward."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(128, 192, bias=False)
    q = bnb.nn.Linear4bit(128, 192, bias=False, compute_dtype=None, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert not q.compute_type_is_set
    return q


def test_a_compute_dtype_set_in_the_first_forward_keeps_one_path():
    """bitsandbytes sets a missing compute dtype during the layer's first forward. Under non-reentrant
    checkpointing that forward and its recompute must take the same path (else the recomputed tensors differ and
    the first backward raises): the layer keeps the per-module path, and its first checkpointed step's gradients
    equal a plain step's."""
    x0 = torch.randn(2, 16, 128).to(torch.bfloat16)
    G = torch.randn(2, 16, 192).to(torch.bfloat16)
    grads = {}
    for mode in ("checkpoint", "plain"):
        layer = LoraLinear(_lazy_nf4(), r=8, alpha=16, dropout=0.05).train()
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        grads[mode] = _run(layer, x0, G, mode)
        assert layer.base_layer.compute_dtype == torch.bfloat16 and grads[mode][4] != ONE_NODE
        assert _run(layer, x0, G, mode)[4] != ONE_NODE  # nor later, once the dtype is set
    for g, p in zip(grads["checkpoint"][:4], grads["plain"][:4], strict=True):
        assert p.abs().max() > 0 and torch.equal(g, p)


class _Box:
    """What a pack hook returns (tracked by weak reference)."""

    def __init__(self, t):
        self.t = t


def test_packed_tensors_are_freed_by_the_backward():
    """Under saved-tensor hooks (CPU offloading, say) the tensors the node packed itself are released when its
    backward runs, as autograd releases saved ones: a second backward is refused with autograd's message, unless
    the first kept the graph (`retain_graph=True`), when both run and the gradients add up."""
    import gc
    import weakref

    layer = _layer("linear-fp32", 0.05)
    x0, G = torch.randn(3, 40, 128), torch.randn(3, 40, 192)
    boxes = []

    def pack(t):
        boxes.append(weakref.ref(box := _Box(t)))
        return box

    def run(retain: bool):
        boxes.clear()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            y = layer(x0.clone().requires_grad_(True))
        assert type(y.grad_fn).__name__ == ONE_NODE and len(boxes) == 5
        y.backward(G, retain_graph=retain)
        gc.collect()
        return y

    y = run(retain=False)
    assert all(b() is None for b in boxes), "packed tensors outlive the backward"
    once = layer.lora_A.weight.grad.clone()
    with pytest.raises(RuntimeError, match="backward through the graph a second time.*retain_graph=True"):
        y.backward(G)
    assert torch.equal(layer.lora_A.weight.grad, once), "a refused backward changed a gradient"
    y = run(retain=True)
    assert all(b() is not None for b in boxes)
    y.backward(G)
    torch.testing.assert_close(layer.lora_A.weight.grad, 2 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("one_node", [True, False])
def test_the_output_may_be_changed_in_place(one_node):
    """A biased Linear over 3-D input returns a view: the layer's output is still a tensor the next module may
    change in place (`ReLU(inplace=True)`), on either path, with the gradients of the same formula in torch ops."""
    layer = _layer("linear-fp32", 0.0)
    handle = None if one_node else _force_per_module(layer)
    x0, G = torch.randn(3, 40, 128), torch.randn(3, 40, 192)
    x = x0.clone().requires_grad_(True)
    y = layer(x)
    assert (type(y.grad_fn).__name__ == ONE_NODE) == one_node
    nn.ReLU(inplace=True)(y).backward(G)
    if handle is not None:
        handle.remove()
    base, A, B = layer.base_layer, layer.lora_A.weight, layer.lora_B.weight
    xr, Ar, Br = x0.clone().requires_grad_(True), A.detach().clone().requires_grad_(True), \
        B.detach().clone().requires_grad_(True)
    torch.relu(base(xr) + layer.scaling * (xr @ Ar.T) @ Br.T).backward(G)
    for got, ref in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_node", [True, False])
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_second_order_gradients_are_refused(one_node, loss):
    """The backward is written for first-order gradients only: one that builds a graph (create_graph=True, for a
    penalty on the gradient) raises, whether or not the incoming gradient itself requires grad (with a loss linear
    in y it does not, and a lazy refusal would let the penalty lose its terms through x and B silently)."""
    layer = _layer("linear-fp32", 0.0)
    handle = None if one_node else _force_per_module(layer)
    x = torch.randn(4, 128, requires_grad=True)
    y = layer(x)
    assert (type(y.grad_fn).__name__ == ONE_NODE) == one_node
    objective = y.pow(2).sum() if loss == "square" else (y * torch.randn(4, 192)).sum()
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph=True"):
        torch.autograd.grad(objective, layer.lora_A.weight, create_graph=True)
    if handle is not None:
        handle.remove()
    (grad_a,) = torch.autograd.grad(layer(x).pow(2).sum(), layer.lora_A.weight)  # first order: fine
    assert grad_a.abs().max() > 0 and not grad_a.requires_grad


@pytest.mark.parametrize("kind", ["linear-bf16", "nf4-bf16"])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("mode", ["plain", "checkpoint"])
@pytest.mark.parametrize("p, layout", [(0.0, "contiguous"), (0.05, "contiguous"), (0.05, "transposed")])
def test_rank_r_products_in_fp32_where_half_matmuls_are_not_native(monkeypatch, kind, native, mode, p, layout):
    """bf16 activations: on a CPU without native bf16 matmuls the rank-r products run in fp32 (the fp32 A and B
    as stored), so ∂A and ∂B are the fp64 formula's to 1e-4 of their largest entry; with native bf16 they are
    products of bf16 roundings (between 1e-4 and 3e-2 off). y and ∂x, rounded once to bf16, are within 2e-2 either
    way, and the checkpointed run equals the plain one bitwise. Also for an input whose features are not its
    innermost dimension in memory (a transposed one, as a permute before the layer gives)."""
    from hf_lowrank import lora_ops
    from hf_lowrank.compat import native_half_matmul
    from hf_lowrank.layers import drop_positions

    assert native_half_matmul(torch.float32) is True and isinstance(native_half_matmul(torch.bfloat16), bool)
    monkeypatch.setattr(lora_ops, "native_half_matmul", lambda dtype: native)
    layer = _layer(kind, p)
    if layout == "transposed":
        x0 = torch.randn(1, 128, 120).to(torch.bfloat16).transpose(1, 2)  # (1, 120, 128), features strided
        assert not x0.reshape(-1, 128).is_contiguous()
    else:
        x0 = torch.randn(3, 40, 128).to(torch.bfloat16)
    G = torch.randn(*x0.shape[:-1], 192).to(torch.bfloat16)
    assert lora_ops.math_dtype(x0) == (torch.bfloat16 if native else torch.float32)
    assert lora_ops.math_dtype(x0.float()) == torch.float32
    y, gx, gA, gB, name = _run(layer, x0, G, mode)
    assert name == ONE_NODE
    torch.manual_seed(7)  # what `_run` seeds before the forward: the same drop positions
    keep = torch.ones(x0.numel(), dtype=torch.float64)
    if p:
        keep.index_fill_(0, drop_positions(x0.numel(), p), 0)
    with torch.no_grad():
        base_y = layer.base_layer(x0).double()
        dense = layer.base_layer.weight if kind.startswith("linear") else \
            __import__("bitsandbytes").functional.dequantize_4bit(layer.base_layer.weight.data,
                                                                 layer.base_layer.weight.quant_state)
    s = layer.scaling / (1 - p)
    x, g = x0.double().reshape(-1, 128), G.double().reshape(-1, 192)
    xt = x * keep.view(x.shape)
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    ga = s * g @ B  # (N, r)
    ref = {"y": base_y.reshape(-1, 192) + s * (xt @ A.T) @ B.T, "x": (ga @ A) * keep.view(x.shape) + g @ dense.double(),
           "A": ga.T @ xt, "B": s * g.T @ (xt @ A.T)}
    for key, got in (("y", y), ("x", gx), ("A", gA), ("B", gB)):
        err = ((got.double().reshape(ref[key].shape) - ref[key]).abs().max() / ref[key].abs().max()).item()
        if key in "AB":
            assert got.dtype == torch.float32
            assert (err < 1e-4) if not native else (1e-4 < err < 3e-2), (key, err)
        else:
            assert got.dtype == torch.bfloat16 and err < 2e-2, (key, err)
    if mode == "checkpoint":
        for a, b in zip((y, gx, gA, gB), _run(layer, x0, G, "plain")[:4], strict=True):
            assert torch.equal(a, b)
