"""The package's structure as specified: one-way layers without cycles, small modules, the layer's own helpers
(dropout mask, hooks on A / B, the bitsandbytes shield's version gate), and `inject`'s own freezing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import drop_mask
from torch import nn

import hf_lowrank
from hf_lowrank import LoraLinear, LowRankConfig
from hf_lowrank.layers import drop_positions, dropout_unscaled

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_lowrank"


def _import_graph():
    import grimp

    return grimp.build_graph("hf_lowrank", include_external_packages=False)


def test_no_import_cycle_among_package_modules():
    """grimp counts imports inside functions too; a cycle is any path from a module back to itself."""
    graph = _import_graph()
    modules = sorted(m for m in graph.modules if m != "hf_lowrank")  # the root only re-exports the API
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle.extend(path[path.index(n):] + [m, n] if n in path else [m, n])
                return True
            if n not in state and visit(n, path + [m]):
                return True
        state[m] = 2
        return False

    for m in modules:
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)
    assert len(modules) >= 20 and any(edges.values())  # the graph was really built


def test_layers_contract_is_kept():
    import subprocess
    import sys

    # in a subprocess: import-linter reconfigures logging in the process that runs it
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 kept, 0 broken" in out.stdout


def test_core_modules_know_no_trainer_files_or_network():
    graph = _import_graph()
    core = ["hf_lowrank.config", "hf_lowrank.layers", "hf_lowrank.inject", "hf_lowrank.merge",
            "hf_lowrank.quantize", "hf_lowrank.launch", "hf_lowrank.format"]
    forbidden = ["hf_lowrank.integrations", "hf_lowrank.state", "hf_lowrank.hub", "hf_lowrank.loading"]
    for low in core:
        for high in forbidden:
            assert not graph.chain_exists(importer=low, imported=high, as_packages=True), (low, high)
    assert not graph.chain_exists(importer="hf_lowrank.state", imported="hf_lowrank.hub")  # files know no network


def test_no_module_over_450_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 450, {k: v for k, v in sizes.items() if v > 450}


# ---- the LoRA layer's helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_mask_rate_and_independence(p):
    """The geometric-gap mask is i.i.d. Bernoulli(p): its rate within 5 standard errors of p over 2e6 draws, and
    neighbouring positions uncorrelated (P(drop, drop) within 5 standard errors of p²)."""
    torch.manual_seed(0)
    n = 2_000_000
    mask = drop_mask(n, p)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    se = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 5 * se
    pairs = (mask[:-1] & mask[1:]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
    gaps = (mask[:-1] & ~mask[1:]).float().mean().item()  # drop followed by keep: p(1-p)
    assert abs(gaps - p * (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(mask, drop_mask(n, p)), "a second draw must differ"


@pytest.mark.parametrize("n", [1, 7, 1000, 300_001])
def test_drop_positions_increasing_in_range_and_redrawn_alike(n):
    torch.manual_seed(3)
    pos = drop_positions(n, 0.3)
    assert pos.dtype == torch.int64 and (pos.numel() == 0 or (pos[0] >= 0 and pos[-1] < n))
    assert bool((pos.diff() > 0).all())
    torch.manual_seed(3)
    assert torch.equal(pos, drop_positions(n, 0.3)), "the same generator state must give the same positions"


def test_dropout_unscaled_folds_the_keep_factor():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    drop = nn.Dropout(0.25).train()
    out, keep = dropout_unscaled(drop, x)
    assert keep == pytest.approx(1 / 0.75)
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # unscaled: the factor goes into the scaling
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    dropped, _ = dropout_unscaled(drop, xg)
    dropped.backward(torch.ones_like(x))
    assert torch.equal(xg.grad, (dropped != 0).float()), "the gradient is zero exactly where x was dropped"
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert dropout_unscaled(drop.eval(), x) == (x, 1.0)
    big, keep_big = dropout_unscaled(nn.Dropout(0.7).train(), x)  # torch's own dropout, already scaled
    assert keep_big == 1.0 and torch.allclose(big[big != 0], x[big != 0] / 0.3)


def test_hooks_on_lora_a_and_b_run_and_change_nothing():
    """A and B are called as modules (what DeepSpeed ZeRO-3 relies on to gather them): forward pre-hooks and hooks
    on them, and global module hooks, run on every forward, and the output equals the hook-free one."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(128, 64), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 128)
    expected = layer(x)
    calls = []
    handles = [layer.lora_A.register_forward_pre_hook(lambda m, a: calls.append("A pre")),
               layer.lora_B.register_forward_hook(lambda m, a, o: calls.append(("B", tuple(o.shape)))),
               nn.modules.module.register_module_forward_pre_hook(
                   lambda m, a: calls.append("global") if m is layer.lora_B else None)]
    try:
        out = layer(x)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["A pre", "global", ("B", (3, 5, 64))]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (expected - layer.base_layer(x)).abs().max() > 1e-3  # B is not zero: the adapter contributes


def test_adapter_computes_in_the_activations_dtype():
    layer = LoraLinear(nn.Linear(128, 64, dtype=torch.bfloat16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and x.grad is not None
    exact = layer.base_layer(x).float() + layer.scaling * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), exact, rtol=2e-2, atol=2e-2)


def test_cpu_repack_shield_is_version_gated(monkeypatch):
    from hf_lowrank import compat

    class Fake4bit(nn.Module):
        support_avx512bf16_for_cpu = True

    m = Fake4bit()
    assert compat.cpu_repack_shield_needed()  # no bitsandbytes release fixes it yet
    compat.shield_cpu_repack(m)
    assert m.support_avx512bf16_for_cpu is False
    monkeypatch.setattr(compat, "BNB_REPACK_FIXED_IN", (0, 1))  # pretend an old release fixed it
    fixed = Fake4bit()
    compat.shield_cpu_repack(fixed)
    assert fixed.support_avx512bf16_for_cpu is True
    compat.shield_cpu_repack(nn.Linear(4, 4))  # other modules: nothing to do, no error


# ---- inject's own freezing (models not built through from_pretrained) -----------------------------------------


def _plain(kind: str):
    from tests.conftest import gpt2_config, llama_config

    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(gpt2_config())
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_inject_and_load_adapter_leave_exactly_the_adapter_trainable(kind, tmp_path):
    """A freshly built model (everything trainable: GPT-2's biases, Llama's norms) after `inject()` or
    `load_adapter()` trains only A, B and the modules_to_save parameters."""
    model = _plain(kind)
    assert all(p.requires_grad for p in model.parameters())
    cfg = LowRankConfig(r=4, quantization=None, modules_to_save=["lm_head"] if kind == "llama" else None)
    hf_lowrank.inject(model, cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted([f"{name}.lora_{ab}.weight" for name, _ in hf_lowrank.lora_layers(model) for ab in "AB"]
                      + (["lm_head.trainable.weight"] if kind == "llama" else []))
    assert trainable == expected and len(expected) > 8
    assert any("bias" in n or "norm" in n for n, _ in model.named_parameters())  # there was something to freeze
    hf_lowrank.save_adapter(model, tmp_path / "a")
    fresh = _plain(kind)
    hf_lowrank.load_adapter(fresh, tmp_path / "a")
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == expected
    adapted = _plain(kind)  # already adapted: loading again keeps exactly the same set trainable
    hf_lowrank.inject(adapted, cfg)
    for p in adapted.parameters():
        p.requires_grad_(True)
    hf_lowrank.load_adapter(adapted, tmp_path / "a")
    assert sorted(n for n, p in adapted.named_parameters() if p.requires_grad) == expected
