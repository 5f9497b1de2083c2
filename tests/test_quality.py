"""Issue 16, quality features: LoRA+ learning-rate groups, trainable new-token rows, DoRA, LoftQ initialisation.

Each test asserts something that is false when the feature is wrong: the optimizer's real learning rates, the
adapter file's real size, outputs equal to PEFT's (with a check that the adapter changes them), errors that fall.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lowrank
from hf_lowrank import LowRankConfig
from hf_lowrank.inject import adapter_modules
from hf_lowrank.state import read_adapter

# ---- LoRA+ ----------------------------------------------------------------------------------------------------


class Motifs(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(1, 256, (8,), generator=torch.Generator().manual_seed(i % 4)).repeat(2)
        return {"input_ids": ids, "labels": ids}


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
    # without a ratio: one learning rate
    hf_lowrank.enable(r=4, quantization=None)
    plain = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=_args(tmp_path / "c", max_steps=1),
                    train_dataset=Motifs())
    plain.train()
    assert _group_lrs(plain) == {"A": {1e-3}, "B": {1e-3}}


def test_loraplus_resume_matches_uninterrupted(tiny_llama, tmp_path):
    hf_lowrank.enable(r=4, quantization=None, loraplus_lr_ratio=16, lora_dropout=0.0)

    def run(out, resume=None, **kw):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        t = Trainer(model=model, args=_args(out, optim="adamw_torch", **kw), train_dataset=Motifs())
        t.train(resume_from_checkpoint=resume)
        return {k: p.detach().clone() for k, p in adapter_modules(model).parameters().items()}

    full = run(tmp_path / "full", save_strategy="steps", save_steps=2)
    resumed = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    halfway = read_adapter(tmp_path / "full" / "checkpoint-2").tensors
    assert any(not torch.equal(t, full[k.removeprefix("base_model.model.")]) for k, t in halfway.items())
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
