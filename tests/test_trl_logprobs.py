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


def test_low_rank_term_and_its_gradient_match_the_full_logits():
    hidden, weight, _, targets = _inputs(torch.float32, False, seed=4)
    g = torch.Generator().manual_seed(5)
    u0, w2 = torch.randn(len(targets), 3, generator=g), torch.randn(weight.shape[0], 3, generator=g)
    g_lp, g_ent = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)
    res = []
    for fn in ("ours", "full"):
        x, u = hidden.clone().requires_grad_(), u0.clone().requires_grad_()
        if fn == "ours":
            out = linear_log_probs(x, weight, targets, low_rank=(u, w2), chunk_size=16, temperature=0.8)
        else:
            out = _reference(torch.cat([x, u], 1), torch.cat([weight, w2], 1), None, targets, temperature=0.8)
        (out[0] * g_lp + out[1] * g_ent).sum().backward()
        res.append((out, x.grad, u.grad))
    (ours, gx, gu), (full, gx_ref, gu_ref) = res
    assert _rel(ours[0], full[0]) < 1e-5 and _rel(ours[1], full[1]) < 1e-5
    assert _rel(gx, gx_ref) < 1e-5 and _rel(gu, gu_ref) < 1e-5 and gu_ref.abs().max() > 0.1


def test_trl_fused_head_sees_trained_token_rows_of_a_tied_head(tmp_path):
    """TRL's head reads only lm_head.weight: with a tied head and trainable_token_indices it would score the frozen
    rows. Through linear_log_probs the fused log-probs (and the token rows' gradient) equal the full logits'."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    path = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    hf_lowrank.enable(r=4, quantization=None, lora_dropout=0.0, trainable_token_indices=[5, 6, 7])
    model = AutoModelForCausalLM.from_pretrained(path).train()
    delta = model.model.embed_tokens.trainable_tokens_delta
    with torch.no_grad():
        delta.normal_(0, 1.0)
    x = torch.tensor([[1, 5, 6, 7, 5, 9, 6, 7, 2, 5]])
    logits = model(input_ids=x).logits  # the stock forward: TiedTokenHead's columns
    want = logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    want.sum().backward()
    want_grad, delta.grad = delta.grad.clone(), None
    add_fused_lm_head(model)
    got = model(input_ids=x, labels=x, fused_lm_head=True).log_probs
    assert _rel(got.detach(), want.detach()) < 1e-5
    got.sum().backward()
    assert _rel(delta.grad, want_grad) < 1e-4 and want_grad.abs().max() > 1e-3
    with hf_lowrank.disabled_adapters(model), torch.no_grad():  # the reference: the frozen rows again
        ref = model(input_ids=x, labels=x, fused_lm_head=True).log_probs
        plain = model(input_ids=x).logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    assert _rel(ref, plain) < 1e-5 and (ref - want.detach()).abs().max() > 0.1


def test_trl_fused_head_refuses_a_trained_head_with_token_rows(tmp_path):
    """modules_to_save=["lm_head"] beside trained token rows of a tied head: TRL's head would train the head and
    ignore the rows; the call is refused, naming both."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    path = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    hf_lowrank.enable(r=4, quantization=None, trainable_token_indices=[5, 6, 7], modules_to_save=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(path).train()
    add_fused_lm_head(model)
    x = torch.tensor([[1, 5, 6, 7, 2]])
    with pytest.raises(ValueError, match="trainable head with trained token rows"):
        model(input_ids=x, labels=x, fused_lm_head=True)
    with hf_lowrank.disabled_adapters(model), torch.no_grad():  # the reference (frozen original head) still runs
        assert model(input_ids=x, labels=x, fused_lm_head=True).log_probs.shape == (1, 4)
