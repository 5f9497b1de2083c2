"""Issue 16, quality features: LoRA+ learning-rate groups, trainable new-token rows, DoRA, LoftQ initialisation.

Each test asserts something that is false when the feature is wrong: the optimizer's real learning rates, the
adapter file's real size, outputs equal to PEFT's (with a check that the adapter changes them), errors that fall.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Motifs
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lowrank
import hf_lowrank.state
from hf_lowrank import LowRankConfig
from hf_lowrank.inject import adapter_modules
from hf_lowrank.loading import bypassed
from hf_lowrank.state import read_adapter

# ---- LoRA+ ----------------------------------------------------------------------------------------------------


def _args(out, **kw):
    return TrainingArguments(**{**dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                       use_cpu=True, learning_rate=1e-3, save_strategy="no", logging_steps=1), **kw})


def _group_lrs(trainer) -> dict[str, set[float]]:
    """{"A": lrs of the groups holding A, "B": ... B}, the groups' learning rates before any schedule."""
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    where = {id(p): g.get("initial_lr", g["lr"]) for g in opt.param_groups for p in g["params"]}
    out: dict[str, set[float]] = {"A": set(), "B": set()}
    for _, layer in hf_lowrank.lora_layers(trainer.model):
        out["A"].add(where[id(layer.lora_A.weight)])
        out["B"].add(where[id(layer.lora_B.weight)])
    return out


def test_loraplus_groups_paged_default_and_explicit_optim(tiny_llama, tmp_path):
    # explicit API, NF4 base, our paged AdamW default
    cfg = LowRankConfig(r=4, loraplus_lr_ratio=16, lora_dropout=0.0)
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, cfg)
    trainer = Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=Motifs(),
                      callbacks=[hf_lowrank.LowRankCallback()])
    trainer.train()
    assert "bitsandbytes" in type(trainer.optimizer.optimizer).__module__
    assert _group_lrs(trainer) == {"A": {1e-3}, "B": {16e-3}}
    trainer.save_model(str(tmp_path / "a" / "final"))
    with safe_open(str(tmp_path / "a" / "final" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["hf_lowrank.loraplus_lr_ratio"] == "16.0"
    assert read_adapter(tmp_path / "a" / "final").config.loraplus_lr_ratio == 16

    # the two-line hook with the user's own optim
    hf_lowrank.enable(r=4, quantization=None, loraplus_lr_ratio=4, lora_dropout=0.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trainer = Trainer(model=model, args=_args(tmp_path / "b", optim="adamw_torch"), train_dataset=Motifs())
    trainer.train()
    assert type(trainer.optimizer.optimizer).__module__.startswith("torch.optim")
    assert _group_lrs(trainer) == {"A": {1e-3}, "B": {4e-3}}
    # a LoRA+ adapter is a plain LoRA file: PEFT and our merge give the trained model's outputs
    from peft import PeftModel

    trainer.save_model(str(tmp_path / "b" / "final"))
    x = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.eval()(x).logits
        with bypassed():  # transformers' own from_pretrained: the plain base
            base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
            plain = base(x).logits
            peft_model = PeftModel.from_pretrained(base, str(tmp_path / "b" / "final")).eval()
        torch.testing.assert_close(peft_model(x).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf_lowrank.merge(model)(x).logits, want, rtol=1e-4, atol=1e-4)
        assert (want - plain).abs().max() > 1e-3  # the adapter trained
    # without a ratio: one learning rate
    hf_lowrank.enable(r=4, quantization=None)
    plain = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=_args(tmp_path / "c", max_steps=1),
                    train_dataset=Motifs())
    plain.train()
    assert _group_lrs(plain) == {"A": {1e-3}, "B": {1e-3}}


def test_loraplus_and_token_rows_resume_matches_uninterrupted(tiny_llama, tmp_path):
    """Checkpoints hold the token rows beside A and B, and resuming (optimizer groups included) is exact."""
    hf_lowrank.enable(r=4, quantization=None, loraplus_lr_ratio=16, lora_dropout=0.0, trainable_token_indices=[1, 2])

    def run(out, resume=None, **kw):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        t = Trainer(model=model, args=_args(out, optim="adamw_torch", **kw), train_dataset=Motifs())
        t.train(resume_from_checkpoint=resume)
        return {k: p.detach().clone() for k, p in adapter_modules(model).parameters().items()}

    full = run(tmp_path / "full", save_strategy="steps", save_steps=2)
    resumed = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert "model.embed_tokens.token_adapter.trainable_tokens_delta" in full
    halfway = read_adapter(tmp_path / "full" / "checkpoint-2").tensors
    assert any(not torch.equal(t, full[k.removeprefix("base_model.model.")]) for k, t in halfway.items())
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)


# ---- trainable new-token rows ---------------------------------------------------------------------------------


def _tokenizer_with_new_tokens():
    """A 256-word tokenizer with 3 special tokens added (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    hf.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>", "<think>"]})
    return hf


def _resized_base(path, tie: bool, n_tokens: int) -> str:
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=tie))
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    model.save_pretrained(path)
    return str(path)


def _file_bytes(folder) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_small_file_and_peft_both_ways(tmp_path, tie, capsys):
    from peft import PeftModel

    tok = _tokenizer_with_new_tokens()
    new = tok.convert_tokens_to_ids(["<tool>", "</tool>", "<think>"])
    assert new == [256, 257, 258] and len(tok) == 259
    base = _resized_base(tmp_path / "base", tie, len(tok))
    case = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], quantization=None, lora_dropout=0.0)
    ours = hf_lowrank.from_pretrained(AutoModelForCausalLM, base, LowRankConfig(**case, trainable_token_indices=new))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n) == [
        "model.embed_tokens.trainable_tokens_delta"]
    x = torch.tensor([tok.encode("w5 <tool> w7 w9 </tool> w1 <think> w3")])
    assert set(new) <= set(x[0].tolist())
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in hf_lowrank.lora_layers(ours):
            layer.lora_B.weight.normal_(0, 0.05)
        ours.model.embed_tokens.trainable_tokens_delta.normal_(0, 0.1)
    ours.eval()
    got = ours(x).logits
    with hf_lowrank.disabled_adapters(ours):
        before = ours(x).logits
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    torch.testing.assert_close(before, plain(x).logits, rtol=0, atol=1e-6)  # disabled = the base exactly
    assert (got - before).abs().max() > 0.1  # the adapter (rows included) changes the output
    if tie:  # the head's logits for the new tokens use the trained rows
        h = ours.model(x).last_hidden_state
        torch.testing.assert_close(got[..., new], h @ ours.model.embed_tokens.trainable_tokens_delta.T)

    # the file holds 3 rows, not the embedding: about 3 × hidden × 4 bytes more than the LoRA tensors alone
    ours.save_pretrained(tmp_path / "ours")
    lora_only = hf_lowrank.from_pretrained(AutoModelForCausalLM, base, LowRankConfig(**case))
    lora_only.save_pretrained(tmp_path / "lora_only")
    grown = _file_bytes(tmp_path / "ours") - _file_bytes(tmp_path / "lora_only")
    assert 3 * 128 * 4 <= grown <= 3 * 128 * 4 + 400, grown  # + the key, its header entry and the config checksum
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert list(f.get_slice("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
                    .get_shape()) == [3, 128]

    # PEFT reads ours with equal outputs; we read PEFT's with equal outputs
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x).logits, got, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    back = AutoModelForCausalLM.from_pretrained(base)
    hf_lowrank.load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(back.eval()(x).logits, got, rtol=1e-5, atol=1e-5)
    # our load of our file, and the merge into a plain 16-bit model
    again = hf_lowrank.load(AutoModelForCausalLM, tmp_path / "ours").eval()
    torch.testing.assert_close(again(x).logits, got, rtol=0, atol=1e-6)
    merged = hf_lowrank.merge(ours)
    assert not any(isinstance(m, hf_lowrank.layers.TrainableTokens) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, got, rtol=1e-5, atol=1e-5)
    # `hf-lowrank merge` (the checkpoint, tensor by tensor) gives the same model; `inspect` names the rows
    from hf_lowrank.export import inspect_main, merge_main

    assert merge_main([str(tmp_path / "ours"), "--base", base, "--output", str(tmp_path / "merged"),
                       "--dtype", "float32", "--no-drift"]) == 0
    from_cli = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(from_cli(x).logits, got, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "trained tokens  [256, 257, 258]" in out and "vLLM" in out and "trainable_token_indices" in out


def test_trainable_tokens_past_the_embedding_say_resize(tiny_llama):
    with pytest.raises(ValueError, match=r"token 300 is past 'model.embed_tokens'.s 256 rows.*resize_token_embeddings"):
        hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama,
                                   LowRankConfig(r=4, quantization=None, trainable_token_indices=[5, 300]))


# ---- DoRA -----------------------------------------------------------------------------------------------------

DORA_CASES = {"llama-fp32": ("llama", "fp32"), "llama-nf4": ("llama", "nf4"), "gpt2-conv1d": ("gpt2", "fp32")}


def _dora_cfg(kind: str, base: str) -> LowRankConfig:
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_proj"]
    return LowRankConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=0.0,
                         quantization="nf4" if base == "nf4" else None, compute_dtype="float32")


def _randomise_dora(named_parameters, seed: int = 1) -> None:
    """Random B (std 0.05) and magnitudes scaled by 1 ± 0.2, so the DoRA terms matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_dora_matches_peft_both_ways_and_merges(tiny_llama, tiny_gpt2, tmp_path, case):
    from conftest import tokens
    from peft import LoraConfig, PeftModel, get_peft_model
    from test_interop import assert_same, base_model, logits

    kind, base = DORA_CASES[case]
    path = tiny_llama if kind == "llama" else tiny_gpt2
    x = tokens()
    ours = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, _dora_cfg(kind, base))
    layers = list(hf_lowrank.lora_layers(ours))
    assert layers and all(layer.lora_magnitude_vector is not None for _, layer in layers)
    with hf_lowrank.disabled_adapters(ours):
        base_out = logits(ours, x)
    torch.testing.assert_close(logits(ours, x), base_out, rtol=0, atol=1e-5)  # m = ‖W0‖: a fresh adapter is a no-op
    ours.train()
    ours(x, labels=x).loss.backward()
    assert all(layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.abs().sum() > 0
               for _, layer in layers)
    ours.zero_grad()
    _randomise_dora(ours.named_parameters())
    expected = logits(ours, x)

    # PEFT reads ours
    hf_lowrank.state.save_adapter(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert sum(k.endswith(".lora_magnitude_vector") for k in f.keys()) == len(layers)  # noqa: SIM118
    theirs = PeftModel.from_pretrained(base_model(AutoModelForCausalLM, path, base), str(tmp_path / "ours"))
    assert_same(logits(theirs, x), expected, base_out)

    # we read PEFT's own DoRA adapter
    cfg = _dora_cfg(kind, base)
    peft_model = get_peft_model(base_model(AutoModelForCausalLM, path, base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=cfg.target_modules, use_dora=True,
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    _randomise_dora(peft_model.named_parameters(), seed=2)
    peft_out = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    back = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg)
    hf_lowrank.load_adapter(back, tmp_path / "peft")
    assert_same(logits(back, x), peft_out, base_out)

    # merged into a plain 16/32-bit copy: the same outputs, no LoRA layer left
    merged = hf_lowrank.merge(ours, torch.float32)
    assert not list(hf_lowrank.lora_layers(merged))
    assert_same(logits(merged, x), expected, base_out, tol=1e-4)
    # and merged in place (16-bit bases), then taken out again exactly
    if base != "nf4":
        for _, layer in layers:
            layer.merge()
        assert_same(logits(ours, x), expected, base_out, tol=1e-4)
        with hf_lowrank.disabled_adapters(ours):
            torch.testing.assert_close(logits(ours, x), base_out, rtol=1e-5, atol=1e-5)
