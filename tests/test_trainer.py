"""The Trainer plugin: two added lines, adapter-only checkpoints, exact resume, guard, explicit API, subclasses."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HIDE_PEFT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

import hf_lowrank
from hf_lowrank import LowRankConfig

ROOT = Path(__file__).resolve().parents[1]
STOCK = ROOT / "tests" / "fixtures" / "stock_trainer.py"
TWO_LINES = "import hf_lowrank\nhf_lowrank.enable(r=8, lora_alpha=16)\n"
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "training_args.bin"}
# Runs a script with `peft` hidden from the import system, as on a machine without it installed.
NO_PEFT = HIDE_PEFT + textwrap.dedent("""
    import runpy
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
""")


def two_line_script(tmp_path: Path) -> Path:
    """The stock script with the two hf_lowrank lines inserted after its imports."""
    text = STOCK.read_text()
    anchor = "from transformers import AutoModelForCausalLM, Trainer, TrainingArguments\n"
    assert anchor in text
    script = tmp_path / "train.py"
    script.write_text(text.replace(anchor, anchor + TWO_LINES))
    return script


def run_script(script: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", NO_PEFT, str(script), *args], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def stock_run(tiny_llama, tmp_path_factory):
    """The two-line script trained for 30 steps, uninterrupted, with peft hidden."""
    tmp = tmp_path_factory.mktemp("stock")
    script = two_line_script(tmp)
    out = tmp / "out"
    run_script(script, tiny_llama, str(out), "30")
    return script, out


def test_two_lines_train_qlora_with_adapter_only_checkpoints(stock_run):
    _, out = stock_run
    report = json.loads((out / "report.json").read_text())
    assert "Linear4bit" in report["linear_types"] and "LoraLinear" in report["linear_types"]
    assert report["optim_arg"] == "paged_adamw_32bit"
    assert report["optim_module"].startswith("bitsandbytes.optim") and report["optimizer"] == "AdamW"
    assert report["optim_paged"] is True
    assert not any(m.split(".")[0] == "peft" for m in report["modules_loaded"])
    losses = report["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-20",
                                                                                          "checkpoint-30"]
    for ckpt in ("checkpoint-20", "checkpoint-30"):
        assert {p.name for p in (out / ckpt).iterdir()} == CHECKPOINT_FILES
    final = {p.name for p in out.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= final
    assert not final & {"model.safetensors", "pytorch_model.bin", "config.json"}
    tensors = adapter_tensors(out)
    assert len(tensors) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), "B must have trained"


def test_resume_from_checkpoint_20_of_30_matches_uninterrupted(stock_run, tiny_llama, tmp_path):
    script, out = stock_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-20", resumed / "checkpoint-20")
    run_script(script, tiny_llama, str(resumed), "30", str(resumed / "checkpoint-20"))
    a, b = adapter_tensors(out), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    c20 = adapter_tensors(out / "checkpoint-20")
    assert max((a[k] - c20[k]).abs().max().item() for k in a) > 1e-4, "steps 21-30 must have changed the adapter"
    losses = json.loads((resumed / "report.json").read_text())["losses"]
    full = json.loads((out / "report.json").read_text())["losses"]
    assert len(losses) == 30  # the checkpoint's history plus steps 21-30
    assert losses[20:] == pytest.approx(full[20:], abs=1e-4)


class Motifs(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32, vocab=256):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i % 8)
        ids = torch.randint(1, self.vocab, (8,), generator=g).repeat(self.seq // 8)
        return {"input_ids": ids, "labels": ids}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                report_to=[], use_cpu=True, learning_rate=1e-3, save_strategy="no")
    base.update(kw)
    return TrainingArguments(**base)


def test_explicit_api_with_callback(tiny_llama, tmp_path, caplog):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Motifs(),
                      callbacks=[hf_lowrank.LowRankCallback()])
    assert str(trainer.args.optim.value) == "paged_adamw_32bit"
    with caplog.at_level(logging.INFO, logger="hf_lowrank"):
        trainer.train()
    summary = "\n".join(r.getMessage() for r in caplog.records if "training summary" in r.getMessage())
    assert "NF4 + double quant" in summary and "trainable params: 16,384" in summary
    assert "paged state    : none: bitsandbytes does not page on CPU" in summary
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                                "README.md", "training_args.bin"}
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == tiny_llama


def test_user_chosen_optim_is_kept_under_hook(tiny_llama, tmp_path):
    hf_lowrank.enable(r=4, quantization=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    explicit = Trainer(model=model, args=_args(tmp_path, optim="adamw_torch"), train_dataset=Motifs())
    assert explicit.args.optim.value == "adamw_torch"
    explicit.train()
    assert type(explicit.optimizer.optimizer).__module__.startswith("torch.optim")
    default = Trainer(model=model, args=_args(tmp_path), train_dataset=Motifs())
    assert default.args.optim.value == "paged_adamw_32bit"
    assert any(isinstance(c, hf_lowrank.LowRankCallback) for c in default.callback_handler.callbacks)


def test_no_gradient_guard_fires(tiny_llama, tmp_path):
    from hf_lowrank.integrations.callback import NoGradientError

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    # a target whose output never reaches the loss (detached): it and the two feeding it get no gradient
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: o.detach())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Motifs(),
                      callbacks=[hf_lowrank.LowRankCallback()])
    expected = r"3 of 14 LoRA layers got no gradient.*layers.1.mlp.up_proj.*layers.1.mlp.down_proj.*never ran"
    with pytest.raises(NoGradientError, match=expected):
        trainer.train()


def test_load_best_model_at_end(tiny_llama, tmp_path):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    args = _args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                 learning_rate=5e-2)
    trainer = Trainer(model=model, args=args, train_dataset=Motifs(), eval_dataset=Motifs(16),
                      callbacks=[hf_lowrank.LowRankCallback()])
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.name == f"checkpoint-{min(evals, key=evals.get)}"
    saved = adapter_tensors(best)
    params = dict(model.named_parameters())
    for k, t in saved.items():
        torch.testing.assert_close(params[k.removeprefix("base_model.model.")].detach(), t)


def test_sequence_classification_under_hook(tiny_bert, tmp_path):
    class Labels(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            label = i % 2
            ids = torch.randint(1 + 100 * label, 100 + 100 * label, (16,), generator=g)
            return {"input_ids": ids, "labels": torch.tensor(label)}

    hf_lowrank.enable(r=4, lora_alpha=8)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6, learning_rate=1e-2), train_dataset=Labels())
    trainer.train()
    assert (model.classifier.weight.detach() - head_before).abs().max() > 1e-4, "the new head must train"
    model.save_pretrained(tmp_path / "adapter")
    keys = set(adapter_tensors(tmp_path / "adapter"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"


def test_seq2seq_trainer_subclass(tiny_llama, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    hf_lowrank.enable(r=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "s2s"), max_steps=3, save_steps=3, report_to=[],
                                    use_cpu=True, per_device_train_batch_size=4, logging_steps=1)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=Motifs())
    assert trainer.args.optim.value == "paged_adamw_32bit"
    trainer.train()
    assert {p.name for p in (tmp_path / "s2s" / "checkpoint-3").iterdir()} == CHECKPOINT_FILES


def test_trl_sft_trainer(tiny_llama, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is a test dependency; install the test extra")
    from datasets import Dataset

    hf_lowrank.enable(r=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = hf_lowrank_tokenizer(tmp_path)
    data = Dataset.from_list([{"input_ids": Motifs()[i]["input_ids"].tolist()} for i in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, save_steps=3, report_to=[], use_cpu=True,
                         per_device_train_batch_size=4, logging_steps=1, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.args.optim.value == "paged_adamw_32bit"
    trainer.train()
    assert {p.name for p in (tmp_path / "sft" / "checkpoint-3").iterdir()} >= CHECKPOINT_FILES - {"README.md"}
    assert not (tmp_path / "sft" / "checkpoint-3" / "model.safetensors").exists()
    assert trainer.state.log_history[0]["loss"] > 0


def hf_lowrank_tokenizer(tmp_path):
    from hf_lowrank.data import build_tokenizer

    return build_tokenizer(vocab_size=256)


def test_cli_train_builtin_default_writes_loadable_adapter(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_lowrank.cli", "train", "--output_dir", str(out), "--max_steps",
                           "12", "--logging_steps", "2", "--max_length", "64"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adapter: " in proc.stdout and "before: " in proc.stdout and "after:  " in proc.stdout
    assert (out / "loss.png").stat().st_size > 1000
    model = hf_lowrank.load(AutoModelForCausalLM, str(out))
    assert sum(1 for _ in hf_lowrank.lora_layers(model)) == 28
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    saved = adapter_tensors(out)
    params = dict(model.named_parameters())
    for k, t in saved.items():
        torch.testing.assert_close(params[k.removeprefix("base_model.model.")].detach(), t)
    losses = [float(x) for x in __import__("re").findall(r"'loss': '([0-9.]+)'", proc.stdout + proc.stderr)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
