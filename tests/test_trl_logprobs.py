"""`loss.linear_log_probs` (TRL's fused-head statistics for a frozen head, chunk by chunk) and its use by TRL.

Tolerances: fp32 against the full-logits formulas (and TRL's own kernel): 1e-5 relative (max |Δ| / max |ref|) on
every output and on the hidden gradient; bf16 inputs: 2e-2 relative on the hidden gradient and 0.1 absolute on the
statistics (the logits round at bf16's 2⁻⁸ relative, ~0.06 at |z| ≈ 16; the math after them is fp32).
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny

import hf_lowrank
from hf_lowrank.loss import linear_log_probs

trl = pytest.importorskip("trl", reason="TRL is a test dependency; install the test extra")

CASES = {"plain": dict(), "all transforms": dict(softcap=30.0, temperature=0.7, logit_scale=0.5, bias=True)}


def _inputs(dtype, bias: bool, n=70, h=32, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,), generator=g)


def _reference(hidden, weight, bias, targets, softcap=None, temperature=1.0, logit_scale=1.0):
    """The five statistics from the full (N, V) logits, in fp32."""
    z = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = z.log_softmax(-1)
    p = logp.exp()
    return (logp.gather(1, targets[:, None]).squeeze(1), -(p * logp).sum(-1), (2 * logp).logsumexp(-1),
            z.mean(-1), z.argmax(-1) == targets)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("upstream", ["log_probs and entropy", "log_probs only", "entropy only"])
def test_statistics_and_hidden_gradient_match_the_full_logits_fp32(case, upstream):
    kw = dict(CASES[case])
    hidden, weight, bias, targets = _inputs(torch.float32, kw.pop("bias", False))
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)
    use_lp, use_ent = upstream != "entropy only", upstream != "log_probs only"

    got, want = [], []
    for fn in ("ours", "full"):
        x = hidden.clone().requires_grad_()
        out = linear_log_probs(x, weight, targets, bias=bias, chunk_size=16, **kw) if fn == "ours" else \
            _reference(x, weight, bias, targets, **kw)
        (out[0] * g_lp * use_lp + out[1] * g_ent * use_ent).sum().backward()
        (got if fn == "ours" else want).append((out, x.grad))
    (ours, g_ours), (full, g_full) = got[0], want[0]
    for i in range(4):
        assert _rel(ours[i], full[i]) < 1e-5, (i, _rel(ours[i], full[i]))
    assert torch.equal(ours[4], full[4])
    assert _rel(g_ours, g_full) < 1e-5, _rel(g_ours, g_full)
    assert g_full.abs().max() > 0.1  # not trivially equal


@pytest.mark.parametrize("case", CASES)
def test_matches_trl_kernel_fp32_and_bf16(case):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    for dtype, tol_stat, tol_grad in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 0.1, 2e-2)):
        kw = dict(CASES[case])
        hidden, weight, bias, targets = _inputs(dtype, kw.pop("bias", False), seed=2)
        g = torch.Generator().manual_seed(3)
        g_lp, g_ent = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)
        res = []
        for fn in ("ours", "trl"):
            x = hidden.clone().requires_grad_()
            if fn == "ours":
                out = linear_log_probs(x, weight, targets, bias=bias, chunk_size=32, **kw)
            else:
                out = ChunkedLogProbFunction.apply(x, weight, bias, targets, kw.get("temperature", 1.0), 64,
                                                   kw.get("softcap"), kw.get("logit_scale", 1.0),
                                                   ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
            (out[0] * g_lp + out[1] * g_ent).sum().backward()
            res.append((out, x.grad))
        (ours, g_ours), (theirs, g_theirs) = res
        for i in range(4):
            limit = tol_stat if dtype == torch.bfloat16 else tol_stat * theirs[i].abs().max().item()
            assert (ours[i] - theirs[i]).abs().max().item() <= limit, (dtype, i)
        assert (ours[4] != theirs[4]).float().mean() <= (0.0 if dtype == torch.float32 else 0.05)
        assert _rel(g_ours, g_theirs) < tol_grad, (dtype, _rel(g_ours, g_theirs))


def test_no_grad_outputs_subset_and_trainable_head_refused():
    hidden, weight, _, targets = _inputs(torch.float32, False)
    with torch.no_grad():
        lp, ent, sq, mean, top1 = linear_log_probs(hidden, weight, targets, outputs=("mean_logits",))
    assert ent is None and sq is None and top1 is None and not lp.requires_grad
    full = _reference(hidden, weight, None, targets)
    assert _rel(lp, full[0]) < 1e-5 and _rel(mean, full[3]) < 1e-5
    trainable = weight.clone().requires_grad_()
    with pytest.raises(ValueError, match="frozen head: the weight"):
        linear_log_probs(hidden, trainable, targets)


def _nodes(t) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return seen


def test_trl_fused_head_runs_ours_for_our_models_only(tmp_path):
    """Under the two lines, TRL's fused head (`fused_lm_head=True`, as DPO, GRPO, KTO, SFT call it) computes our
    model's log-probs with linear_log_probs, equal to TRL's own kernel; a plain transformers model keeps TRL's."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from hf_lowrank.integrations import registry

    path = save_tiny(tmp_path / "llama", "llama")
    x = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    hf_lowrank.enable(r=8, lora_alpha=16, lora_dropout=0.0, compute_dtype="float32")
    assert "trl.trainer.utils:_ChunkedLogProbFunction" in registry.installed()
    ours = AutoModelForCausalLM.from_pretrained(path).train()
    for _, layer in hf_lowrank.lora_layers(ours):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    add_fused_lm_head(ours, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    out = ours(input_ids=x, labels=x, fused_lm_head=True)
    assert any(n.startswith("_LinearLogProbs") for n in _nodes(out.log_probs)), _nodes(out.log_probs)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    hf_lowrank.disable()  # the patch stays; a model hf_lowrank did not load is not ours
    plain = AutoModelForCausalLM.from_pretrained(path).train()
    add_fused_lm_head(plain)
    assert not any(n.startswith("_LinearLogProbs") for n in _nodes(plain(input_ids=x, labels=x,
                                                                         fused_lm_head=True).log_probs))
    registry.uninstall(target="trl.trainer.utils:_ChunkedLogProbFunction")  # TRL's kernel on our model: the same
    ours.zero_grad()
    again = ours(input_ids=x, labels=x, fused_lm_head=True)
    assert not any(n.startswith("_LinearLogProbs") for n in _nodes(again.log_probs))
    (again.log_probs.sum() + again.entropy.sum()).backward()
    assert _rel(out.log_probs.detach(), again.log_probs.detach()) < 1e-5
    for n, g in grads.items():
        assert _rel(g, dict(ours.named_parameters())[n].grad) < 1e-4, n
