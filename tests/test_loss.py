"""Chunked linear + cross-entropy: the same loss and gradients as the stock path, without the logits.

Tolerances, as max |Δ| / max |reference| per tensor: fp32 1e-5 on the loss and on every gradient; bf16 (and NF4 with
bf16 compute) 1e-3 on the loss and 2e-2 on each gradient (bf16 rounds at 2⁻⁸ ≈ 4e-3; chunked matmuls and the fp32
accumulation of the head's gradient round differently from one big matmul).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hf_lowrank
from hf_lowrank import LowRankConfig
from hf_lowrank.fused_lm import (
    disable_fused_loss,
    enable_fused_loss,
    fused_causal_lm_forward,
    fused_lm_supported,
    fused_loss_status,
)
from hf_lowrank.loss import auto_chunk_size, linear_cross_entropy
from tests.conftest import randomize_b, save_tiny, tokens

FP32 = dict(loss=1e-5, grad=1e-5)
BF16 = dict(loss=1e-3, grad=2e-2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---- the function itself, against transformers' ForCausalLMLoss on the full logits ----------------------------------


def _stock_loss(h, w, labels, bias=None, softcap=None, num_items_in_batch=None):
    from transformers.loss.loss_utils import ForCausalLMLoss

    z = F.linear(h, w, bias)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return ForCausalLMLoss(z, labels, w.shape[0], num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize(("softcap", "nib", "bias"), [(None, None, False), (4.0, 41, True), (None, 29, True)])
def test_function_matches_for_causal_lm_loss(dtype, recompute, softcap, nib, bias):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 23, 64, 200
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.2).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100
    labels[2, -4:] = -100
    params = [t for t in (h, w, b) if t is not None]
    ref = _stock_loss(h, w, labels, b, softcap, nib)
    ref_grads = torch.autograd.grad(ref * 2.5, params)  # an upstream factor, as gradient accumulation gives
    loss = linear_cross_entropy(h, w, labels, bias=b, softcap=softcap, num_items_in_batch=nib, chunk_size=16,
                                recompute=recompute)
    grads = torch.autograd.grad(loss * 2.5, params)
    tol = FP32 if dtype == torch.float32 else BF16
    assert loss.dtype == torch.float32
    assert rel(loss, ref) <= tol["loss"]
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) <= tol["grad"]


@pytest.mark.parametrize("recompute", [False, True])
def test_function_under_autocast(recompute):
    """Under torch.autocast (Trainer(bf16=True)) the head's matmul runs in bf16 as the stock head's would; the
    gradients come back in the fp32 inputs' dtype."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 17, 64, generator=g, requires_grad=True)
    w = (torch.randn(128, 64, generator=g) * 0.2).requires_grad_()
    labels = torch.randint(0, 128, (2, 17), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _stock_loss(h, w, labels)
        loss = linear_cross_entropy(h, w, labels, chunk_size=8, recompute=recompute)
    ref_grads = torch.autograd.grad(ref, [h, w])
    grads = torch.autograd.grad(loss, [h, w])
    assert rel(loss, ref) <= BF16["loss"]
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32 and rel(got, want) <= BF16["grad"]


def test_function_shift_labels_low_rank_and_errors():
    g = torch.Generator().manual_seed(1)
    N, H, V, r = 40, 32, 96, 4
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    u = torch.randn(N, r, generator=g, requires_grad=True)
    w2 = torch.randn(V, r, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    ref = F.cross_entropy(h @ w.T + u @ w2.T, y, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [h, w, u, w2])
    loss = linear_cross_entropy(h, w, y, shift=False, low_rank=(u, w2), chunk_size=7)
    for got, want in zip(torch.autograd.grad(loss, [h, w, u, w2]), ref_grads, strict=True):
        assert rel(got, want) <= 1e-5
    assert rel(loss, ref) <= 1e-6
    with pytest.raises(ValueError, match=r"outside \[0, 96\)"):
        linear_cross_entropy(h, w, torch.full((N,), 96), shift=False)
    with torch.no_grad():  # no grad mode: the loss only
        assert rel(linear_cross_entropy(h, w, y, shift=False, low_rank=(u, w2)), ref) <= 1e-6
    assert auto_chunk_size(128_256) == 128 and auto_chunk_size(32_000) == 512 and auto_chunk_size(256) == 8192


# ---- whole models: the stock forward against the fused one ---------------------------------------------------------


def _load(path, dtype=None, **fields) -> torch.nn.Module:
    fields = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "quantization": None, "fused_loss": False, **fields}
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, LowRankConfig(**fields), **kwargs)
    randomize_b(model)
    return model.train()


def _step(model, fused: bool, **inputs):
    """(loss, {name: grad}) of one forward + backward, stock or fused; same RNG state for both."""
    if fused:
        assert enable_fused_loss(model, chunk_size=8).startswith("fused")
    else:
        disable_fused_loss(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = model(**inputs)
    assert (out.logits is None) == fused
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return out.loss.detach(), grads


def _assert_same(model, tol, **inputs):
    ref_loss, ref = _step(model, False, **inputs)
    loss, got = _step(model, True, **inputs)
    disable_fused_loss(model)
    assert rel(loss, ref_loss) <= tol["loss"], (loss, ref_loss)
    assert got.keys() == ref.keys() and len(ref) > 0
    worst = max(ref, key=lambda n: rel(got[n], ref[n]))
    assert rel(got[worst], ref[worst]) <= tol["grad"], (worst, rel(got[worst], ref[worst]))
    return ref


def _padded(vocab=256, batch=3, seq=24):
    ids = tokens(batch, seq, vocab)
    mask = torch.ones_like(ids)
    mask[1, -9:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :6] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_llama_padding_and_gradient_accumulation(tiny_llama, dtype, tol):
    model = _load(tiny_llama, dtype=dtype)
    batch = _padded()
    grads = _assert_same(model, tol, **batch)
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    # gradient accumulation: the Trainer passes the token count of the whole accumulated batch
    n = (batch["labels"][:, 1:] != -100).sum() * 3
    _assert_same(model, tol, **batch, num_items_in_batch=n)


def test_nf4_base(tiny_llama):
    model = _load(tiny_llama, quantization="nf4", lora_dropout=0.05)  # same RNG state: the same dropout masks
    _assert_same(model, BF16, **_padded())


def test_tied_head_frozen_and_trainable(tmp_path):
    path = save_tiny(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same(model, FP32, **_padded())
    trainable = _load(path, modules_to_save=["lm_head"])  # a trained copy of the head beside the tied original
    head = trainable.lm_head
    assert head.weight.requires_grad and head.weight is not trainable.model.embed_tokens.weight
    assert trainable.lm_head.original.weight is trainable.model.embed_tokens.weight
    grads = _assert_same(trainable, FP32, **_padded())
    assert "lm_head.trainable.weight" in grads


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_trainable_lm_head(tiny_llama, dtype, tol):
    model = _load(tiny_llama, dtype=dtype, modules_to_save=["lm_head"])
    grads = _assert_same(model, tol, **_padded())
    assert "lm_head.trainable.weight" in grads


def test_lora_on_the_head(tiny_llama):
    """A LoraLinear around the head: its low-rank term joins the chunked matmul (dropout masks drawn alike)."""
    model = _load(tiny_llama, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.1)
    assert isinstance(model.lm_head, hf_lowrank.LoraLinear)
    grads = _assert_same(model, FP32, **_padded())
    assert "lm_head.lora_A.weight" in grads and "lm_head.lora_B.weight" in grads


def test_softcap_gemma2(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=256, final_logit_softcapping=2.0, pad_token_id=0)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "gemma2")
    model = _load(str(tmp_path / "gemma2"))
    assert fused_lm_supported(model) is True
    _assert_same(model, FP32, **_padded())
    # the soft-cap matters here: without it the loss differs
    batch = _padded()
    with torch.no_grad():
        enable_fused_loss(model)
        capped = model(**batch).loss
        uncapped = fused_causal_lm_forward(model, softcap=None, **batch).loss
    assert abs(capped - uncapped) > 1e-3


def test_shift_labels_and_positional_args(tiny_llama):
    model = _load(tiny_llama)
    batch = _padded()
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    enable_fused_loss(model)
    with torch.no_grad():
        by_keyword = model(**batch).loss
        by_position = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        pre_shifted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], shift_labels=shifted).loss
    assert model(**batch).logits is None
    assert rel(by_position, by_keyword) == 0 and rel(pre_shifted, by_keyword) <= 1e-6


# ---- memory: nothing of size (batch·seq, vocab), ever ---------------------------------------------------------------


def test_no_logits_sized_tensor_in_graph_or_ops(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    V, T = 32_000, 1024
    path = save_tiny(tmp_path / "bigvocab", "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, vocab_size=V, max_position_embeddings=T)
    model = _load(path)
    ids = tokens(1, T, V)

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    def measure(fused: bool) -> tuple[int, int]:
        (enable_fused_loss if fused else disable_fused_loss)(model)
        model.zero_grad(set_to_none=True)
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with Largest() as mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return max(saved), mode.largest

    stock_saved, stock_largest = measure(False)
    fused_saved, fused_largest = measure(True)
    assert stock_saved >= T * V and stock_largest >= T * V  # the check sees the logits when they exist
    assert fused_saved < T * V // 2, fused_saved
    assert fused_largest <= auto_chunk_size(V) * V <= T * V // 2, fused_largest  # one chunk's logits at most


# ---- which models take it, and the wrapper's manners ----------------------------------------------------------------


def test_unsupported_models_keep_the_stock_path(tmp_path, tiny_bert):
    from transformers import CohereConfig, CohereForCausalLM

    cohere = CohereForCausalLM(CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    reason = fused_lm_supported(cohere)
    assert isinstance(reason, str) and "logit_scale" in reason
    assert enable_fused_loss(cohere) == f"stock ({reason})" == fused_loss_status(cohere)
    assert "forward" not in cohere.__dict__
    from transformers import AutoModelForMaskedLM

    bert = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    assert isinstance(fused_lm_supported(bert), str)


def test_models_that_change_the_head_input_or_logits_in_place_keep_the_stock_path():
    """MiniCPM3 divides the hidden states by `logits_scaling` before its head; Chameleon writes into its logits (image
    tokens masked): both are refused with the line that does it, and MiniCPM3's loss stays the stock one."""
    from transformers import ChameleonForConditionalGeneration, MiniCPM3Config, MiniCPM3ForCausalLM

    from hf_lowrank.lm_forward import forward_plan

    torch.manual_seed(0)
    cfg = MiniCPM3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=16, v_head_dim=16)
    model = MiniCPM3ForCausalLM(cfg).train()
    reason = fused_lm_supported(model)
    assert isinstance(reason, str) and "changes the hidden states before the head" in reason
    assert "logits_scaling" in reason
    ids = tokens(2, 12, 128)
    stock = model(input_ids=ids, labels=ids).loss
    assert enable_fused_loss(model) == f"stock ({reason})"
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.equal(out.loss, stock)
    chameleon = forward_plan(ChameleonForConditionalGeneration, "model", "lm_head")
    assert isinstance(chameleon, str) and "changes the logits in place" in chameleon and "image_tokens" in chameleon


class _ScalesHiddenInPlace:
    """A forward of the stock shape that scales the hidden states in place before the head."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states.mul_(0.5)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size)
        return loss, logits


def test_an_in_place_change_of_the_head_input_keeps_the_stock_path():
    from hf_lowrank.lm_forward import Plan, forward_plan

    reason = forward_plan(_ScalesHiddenInPlace, "model", "lm_head")
    assert isinstance(reason, str) and "changes the hidden states before the head: `hidden_states.mul_(0.5)`" in reason
    assert isinstance(forward_plan(_KeepsHidden, "model", "lm_head"), Plan)  # the same forward without it


class _KeepsHidden:
    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size)
        return loss, logits


def test_a_dora_head_keeps_the_stock_path(tiny_llama):
    """DoRA on the head scales its output by m/‖W0 + s·B·A‖, which the chunked matmul does not: refused."""
    model = _load(tiny_llama, target_modules=["q_proj", "lm_head"], use_dora=True)
    assert model.lm_head.lora_magnitude_vector is not None
    reason = fused_lm_supported(model)
    assert reason == "the output head has a DoRA adapter"
    assert enable_fused_loss(model) == f"stock ({reason})"
    batch = _padded()
    out = model(**batch)
    out.loss.backward()
    assert out.logits is not None and model.lm_head.lora_magnitude_vector.grad.abs().max() > 0


def test_return_dict_false_keeps_the_stock_positions(tiny_llama):
    """A tuple output has the stock positions, (loss, logits, …) with logits None, not the cache moved up."""
    model = _load(tiny_llama)
    batch = _padded()
    stock = model(**batch, return_dict=False)
    enable_fused_loss(model, chunk_size=8)
    fused = model(**batch, return_dict=False)
    disable_fused_loss(model)
    assert len(fused) == len(stock) >= 3 and fused[1] is None and stock[1] is not None
    assert [type(t) for t in fused[2:]] == [type(t) for t in stock[2:]]
    assert rel(fused[0], stock[0]) <= FP32["loss"]


def test_fp16_gradients_under_a_loss_scale():
    """In fp16 a gradient taken before the loss scale is known underflows (and the scale overflows fp16), so the
    backward always recomputes there: under GradScaler's initial scale 2¹⁶ the gradients are finite and within
    fp16's rounding of the stock path's, whichever `recompute` was asked for."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(2, 33, 64, generator=g)).to(torch.float16).requires_grad_()
    w = (torch.randn(3000, 64, generator=g) * 0.2).to(torch.float16).requires_grad_()
    labels = torch.randint(0, 3000, (2, 33), generator=g)
    scale = 2.0 ** 16
    ref = torch.autograd.grad(_stock_loss(h, w, labels, num_items_in_batch=4096) * scale, [h, w])
    for recompute in (False, True):
        loss = linear_cross_entropy(h, w, labels, num_items_in_batch=4096, chunk_size=16, recompute=recompute)
        grads = torch.autograd.grad(loss * scale, [h, w])
        for got, want in zip(grads, ref, strict=True):
            assert got.dtype == torch.float16 and torch.isfinite(got).all()
            assert rel(got, want) <= 1e-2, rel(got, want)
    from transformers import LlamaConfig, LlamaForCausalLM

    fp16_model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=128)).half()
    assert "backward recomputes the logits" in enable_fused_loss(fp16_model)  # the summary line says so


def test_mixtral_router_loss_takes_the_stock_path():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
                                             num_local_experts=2, num_experts_per_tok=1)).train()
    assert enable_fused_loss(model).startswith("fused")
    ids = tokens(2, 16, 128)
    assert model(input_ids=ids, labels=ids).logits is None
    with_router = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert with_router.logits is not None and with_router.aux_loss is not None  # the stock forward, router loss in


def test_wrapper_keeps_signature_eval_generate_and_survives_accelerate(tiny_llama):
    from accelerate import Accelerator

    model = _load(tiny_llama)
    class_forward = type(model).forward
    before = inspect.signature(model.forward)
    assert fused_loss_status(model) == "stock (fused loss not enabled)"
    text = enable_fused_loss(model)
    assert fused_loss_status(model) == text
    assert text == "fused linear+cross-entropy (chunks of 8192 tokens, gradients in the forward; no logits in " \
                   "training forwards)"
    assert inspect.signature(model.forward) == before
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in before.parameters.values())
    assert type(model).forward is class_forward  # nothing patched on the class
    ids = tokens(2, 12)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        assert out.logits is not None and out.logits.shape == (2, 12, 256)  # evaluation is unchanged
        generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    disable_fused_loss(model)
    assert "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids[:, :4], max_new_tokens=3, do_sample=False), generated)
    enable_fused_loss(model)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier Trainer in this process fixed its precision
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = acc.prepare(model)
    unwrapped = acc.unwrap_model(prepared)
    unwrapped.train()
    assert unwrapped(input_ids=ids, labels=ids).logits is None  # ours survived accelerate's wrap and unwrap
    disable_fused_loss(unwrapped)


def test_deepcopy_runs_the_copy(tiny_llama):
    """TRL's reference models are deep copies: the copy's wrapper must run the copy's weights, fused and stock."""
    import copy

    model = _load(tiny_llama)
    enable_fused_loss(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.zero_()
    ids = tokens(2, 12)
    with torch.no_grad():
        assert abs(clone(input_ids=ids, labels=ids).loss.item() - torch.log(torch.tensor(256.0)).item()) < 1e-5
        assert model(input_ids=ids, labels=ids).loss.item() > 0
        assert clone.eval()(input_ids=ids).logits.abs().max() == 0
        assert model.eval()(input_ids=ids).logits.abs().max() > 0
    disable_fused_loss(clone)
    assert "forward" not in clone.__dict__ and model.forward.__name__ == "forward" and "forward" in model.__dict__


# ---- the Trainer and TRL -------------------------------------------------------------------------------------------


def _dataset(n=16, seq=20, vocab=256):
    from datasets import Dataset

    rows = []
    for i in range(n):
        ids = tokens(1, seq, vocab, seed=i)[0]
        length = seq - (i % 5)
        mask = torch.zeros(seq, dtype=torch.long)
        mask[:length] = 1
        rows.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                     "labels": ids.masked_fill(mask == 0, -100).tolist()})
    return Dataset.from_list(rows)


def _train(path, tmp, fused: bool):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = _load(path)
    if fused:
        assert enable_fused_loss(model, chunk_size=16).startswith("fused")
    args = TrainingArguments(str(tmp), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=5e-3, optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0, data_seed=0, per_device_eval_batch_size=4)
    data = _dataset()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)))
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the forward
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def _count_fused_calls(monkeypatch) -> list:
    import hf_lowrank.fused_lm as loss_module  # where the fused forward calls it

    calls, real = [], loss_module.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "linear_cross_entropy", counted)
    return calls


def test_trainer_losses_match_stock_and_eval_keeps_logits(tiny_llama, tmp_path, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    _, stock = _train(tiny_llama, tmp_path / "stock", fused=False)
    assert calls == []
    trainer, fused = _train(tiny_llama, tmp_path / "fused", fused=True)
    assert len(calls) == 8 and all(n is not None for n in calls)  # 4 steps × 2 micro-batches, with the GA count
    assert len(fused) == len(stock) == 4
    for a, b in zip(fused, stock, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (fused, stock)
    prediction = trainer.predict(trainer.eval_dataset)
    assert prediction.predictions.shape == (4, 20, 256)  # evaluation still returns the logits
    assert prediction.metrics["test_loss"] > 0


def test_trl_sft_trainer_with_the_wrapper(tiny_llama, tmp_path, monkeypatch):
    """SFTTrainer installs its own chunked head and calls model(..., fused_lm_head=True): that call passes through
    our wrapper (whichever is installed first), and its metrics (entropy, token accuracy) are there."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from hf_lowrank.data import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=256)
    data = Dataset.from_list([{"input_ids": tokens(1, 20, 256, seed=i)[0].tolist()} for i in range(8)])

    def run(order: str):
        torch.manual_seed(0)
        model = _load(tiny_llama)
        if order == "before":
            enable_fused_loss(model)
        args = trl.SFTConfig(output_dir=str(tmp_path / order), max_steps=2, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0,
                             optim="adamw_torch", learning_rate=5e-3)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        if order == "after":
            assert enable_fused_loss(model).startswith("fused")
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert all("entropy" in h and "mean_token_accuracy" in h for h in logs)
        return [h["loss"] for h in logs]

    calls = _count_fused_calls(monkeypatch)
    stock = run("stock")
    for order in ("before", "after"):
        got = run(order)
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, stock, strict=True)), (order, got, stock)
    assert calls == []  # TRL's own chunked head computed every training loss


def test_on_by_default_under_the_two_lines_and_in_the_summary(tiny_llama, tmp_path, monkeypatch, caplog):
    """`fused_loss=True` (the default): the hook's model trains through the chunked loss, the summary says so, and
    `fused_loss=False` keeps the stock path."""
    import logging

    from transformers import Trainer, TrainingArguments

    calls = _count_fused_calls(monkeypatch)
    hf_lowrank.enable(r=4, lora_dropout=0.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert fused_loss_status(model).startswith("fused linear+cross-entropy")
    ids = tokens(4, 16)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    args = TrainingArguments(str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="hf_lowrank"):
        Trainer(model=model, args=args, train_dataset=data).train()
    assert len(calls) == 2
    summary = "\n".join(r.getMessage() for r in caplog.records if "training summary" in r.getMessage())
    assert "loss path      : fused linear+cross-entropy" in summary
    hf_lowrank.disable()
    stock = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, fused_loss=False))
    assert fused_loss_status(stock) == "stock (fused loss not enabled)"
