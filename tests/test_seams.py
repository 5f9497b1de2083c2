"""Where transformers 5 assumes `peft` (DESIGN.md §3), and the registry of our patches on it.

Each seam is tested by behaviour: what transformers does to our models without the seam (so a test fails when
transformers changes and the seam is no longer needed or no longer enough), and what it does with it.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

import hf_lowrank
from hf_lowrank import LowRankConfig
from hf_lowrank.integrations import registry
from tests.conftest import HIDE_PEFT, tokens

ROOT = Path(__file__).resolve().parents[1]
NO_PEFT = HIDE_PEFT


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_PEFT + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_quantized_model_gate_refuses_plain_4bit_and_accepts_ours(tiny_llama):
    from transformers import BitsAndBytesConfig
    from transformers.trainer_utils import validate_quantization_for_training

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(plain)
    ours = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4))
    validate_quantization_for_training(ours)  # no error
    assert ours._hf_peft_config_loaded is True


def test_flag_alone_sends_save_pretrained_to_peft(tiny_llama, tmp_path):
    """Why flagged models get their own `save_pretrained`: transformers' own, for a model with the flag, needs peft
    (and without peft installed it fails), while ours writes the adapter files and never imports peft."""
    out = _run(f"""
        import os, sys, hf_lowrank
        from transformers import AutoModelForCausalLM, PreTrainedModel
        m = hf_lowrank.from_pretrained(AutoModelForCausalLM, {tiny_llama!r}, hf_lowrank.LowRankConfig(r=4))
        m.save_pretrained({str(tmp_path / 'ours')!r})
        print(sorted(os.listdir({str(tmp_path / 'ours')!r})), 'peft' in sys.modules)
        try:
            PreTrainedModel.save_pretrained(m, {str(tmp_path / 'stock')!r})
            print('STOCK SAVED', sorted(os.listdir({str(tmp_path / 'stock')!r})))
        except Exception as e:
            print('STOCK FAILED', type(e).__name__, e)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['README.md', 'adapter_config.json', 'adapter_model.safetensors'] False" in out.stdout
    assert "STOCK FAILED" in out.stdout and "peft" in out.stdout.split("STOCK FAILED", 1)[1].lower(), out.stdout


def test_trainer_save_hands_its_state_dict_to_save_pretrained(tiny_llama, tmp_path):
    """`Trainer._save(dir, state_dict=...)` (what it calls with DeepSpeed / FSDP's gathered tensors) ends in our
    `save_pretrained` with that state dict: the adapter file holds exactly the tensors handed over."""
    from safetensors.torch import load_file

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True))
    given = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if ".lora_" in k}
    trainer._save(str(tmp_path / "saved"), state_dict=given)
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert len(saved) == len(given) == 28
    assert all(torch.all(t == 0.5) for t in saved.values())


def test_filtered_state_dict_is_the_one_given(tiny_llama, tmp_path):
    """`save_pretrained(state_dict=...)` saves the tensors it is handed (what DeepSpeed/FSDP gathered)."""
    from safetensors.torch import load_file

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    given = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if ".lora_" in k}
    model.save_pretrained(tmp_path, state_dict=given)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == len(given) == 28
    assert all(torch.all(t == 0.5) for t in saved.values())


def test_checkpoint_loaders_keep_their_signatures():
    hf_lowrank.LowRankCallback()  # installs the trainer seams
    params = list(inspect.signature(Trainer._load_from_checkpoint).parameters)
    assert params[:3] == ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]


def test_stock_trainer_cannot_resume_or_reload_our_checkpoints(tiny_llama, tmp_path):
    """Without the "trainer" patches, transformers neither resumes from nor reloads the best of our adapter-only
    checkpoints; the day it can, this test fails and the patches can go."""
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    hf_lowrank.save_adapter(model, tmp_path / "checkpoint-1")
    registry.uninstall()
    try:
        trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True))
        with pytest.raises(ValueError, match="Can't find a (valid )?checkpoint"):
            trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    finally:
        hf_lowrank.LowRankCallback()  # reinstall for the other tests of this process
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_B" in k}
    with torch.no_grad():
        for _, layer in hf_lowrank.lora_layers(model):
            layer.lora_B.weight.fill_(1.0)
    Trainer(model=model, args=TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True)) \
        ._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_checkpointing_enables_input_grads_for_flagged_models(tiny_llama):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    model.disable_input_require_grads()
    model.gradient_checkpointing_enable()
    assert model.get_input_embeddings()(tokens()).requires_grad


def test_training_arguments_record_explicit_fields():
    from hf_lowrank.integrations.callback import explicit_fields

    hf_lowrank.enable(r=4)
    args = TrainingArguments(output_dir="x", optim="adamw_torch", report_to=[])
    assert explicit_fields(args) == frozenset({"output_dir", "optim", "report_to"})
    from transformers import Seq2SeqTrainingArguments

    assert "optim" not in explicit_fields(Seq2SeqTrainingArguments(output_dir="x"))
    default = next(f.default for f in __import__("dataclasses").fields(TrainingArguments) if f.name == "optim")
    assert str(getattr(default, "value", default)).startswith("adamw"), default


# ---- the registry ----------------------------------------------------------------------------------------------


def test_every_patch_is_registered_with_a_reason_and_an_existing_test():
    pytest.importorskip("trl")
    import trl.trainer.dpo_trainer  # noqa: F401  (TRL's patches are installed when its trainer modules are imported)
    import trl.trainer.grpo_trainer  # noqa: F401
    import trl.trainer.kto_trainer  # noqa: F401
    import trl.trainer.rloo_trainer  # noqa: F401

    hf_lowrank.enable(r=4)
    assert set(registry.installed()) == set(registry.PATCHES)
    groups = [p.group for p in registry.PATCHES.values()]
    assert (groups.count("trainer"), groups.count("hook"), groups.count("trl.logprobs"), len(groups)) == (10, 3, 1, 23)
    for target, patch in registry.PATCHES.items():
        assert len(patch.why) > 60, target
        path, _, name = patch.test.partition("::")
        assert name and f"def {name}(" in (ROOT / path).read_text(), (target, patch.test)
        owner, attr = patch.resolve()
        current = inspect.getattr_static(owner, attr)
        assert getattr(getattr(current, "__func__", current), "__wrapped__", None) is not None, target


def test_uninstall_restores_the_original_attributes():
    from transformers import Trainer as T
    from transformers import trainer as trainer_module

    hf_lowrank.disable()
    registry.uninstall()
    originals = {t: inspect.getattr_static(*p.resolve()) for t, p in registry.PATCHES.items()}
    assert "_hf_lowrank_explicit" not in TrainingArguments(output_dir="x", report_to=[]).__dict__
    hf_lowrank.enable(r=4)
    assert T.__init__ is not originals["transformers:Trainer.__init__"]
    assert "_hf_lowrank_explicit" in TrainingArguments(output_dir="x", report_to=[]).__dict__
    registry.uninstall()
    assert registry.installed() == []
    for target, patch in registry.PATCHES.items():
        if target.endswith("TrainingArguments.__new__"):
            continue
        assert inspect.getattr_static(*patch.resolve()) is originals[target], target
    # inherited before: CPython cannot take a class's own __new__ back, so a pass-through equivalent replaces ours
    args = TrainingArguments(output_dir="x", optim="adamw_torch", report_to=[])
    assert args.optim.value == "adamw_torch" and "_hf_lowrank_explicit" not in args.__dict__
    assert PreTrainedModel.from_pretrained.__func__ is originals[
        "transformers:PreTrainedModel.from_pretrained"].__func__
    assert trainer_module.deepspeed_load_checkpoint is originals["transformers.trainer:deepspeed_load_checkpoint"]


def test_disable_and_plain_inject_install_nothing():
    """`hf_lowrank.disable()` and `inject()` on a plain torch module import no Trainer and patch nothing."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, torch, hf_lowrank
        hf_lowrank.disable()
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        hf_lowrank.inject(m, hf_lowrank.LowRankConfig(r=4, quantization=None))
        from hf_lowrank.integrations import installed
        print(len(list(hf_lowrank.lora_layers(m))), installed(), 'transformers' in sys.modules,
              [n for n, p in m.named_parameters() if p.requires_grad])
    """)], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "[]", "False", "['0.lora_A.weight',", "'0.lora_B.weight',",
                                  "'2.lora_A.weight',", "'2.lora_B.weight']"]


STOCK_RUN = """
    import json, sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    PATCHED = sys.argv[1] == "patched"
    if PATCHED:
        import hf_lowrank
        hf_lowrank.enable(r=4)                        # every patch installed ...
        assert len(hf_lowrank.integrations.installed()) == 13
        hf_lowrank.disable()                          # ... and all but the from_pretrained hook stay
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    class Data(torch.utils.data.Dataset):
        def __len__(self): return 32
        def __getitem__(self, i):
            ids = torch.randint(1, 128, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}
    def args(steps):
        return TrainingArguments(sys.argv[2], max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, learning_rate=1e-3, logging_steps=1, seed=0)
    Trainer(model=model, args=args(4), train_dataset=Data()).train()
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    t = Trainer(model=fresh, args=args(6), train_dataset=Data())
    t.train(resume_from_checkpoint=sys.argv[2] + "/checkpoint-4")
    t.save_model(sys.argv[2] + "/final")
    print("RESULT", json.dumps({"losses": [h["loss"] for h in t.state.log_history if "loss" in h],
                                "files": sorted(__import__("os").listdir(sys.argv[2] + "/final")),
                                "sum": sum(p.double().sum().item() for p in fresh.parameters())}))
"""


def test_stock_model_trains_saves_and_resumes_exactly_as_without_patches(tmp_path):
    results = {}
    for mode in ("plain", "patched"):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(STOCK_RUN), mode, str(tmp_path / mode)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        results[mode] = json.loads(out.stdout.split("RESULT", 1)[1])
    assert results["plain"]["files"] == results["patched"]["files"]
    assert "model.safetensors" in results["patched"]["files"]
    assert results["plain"]["losses"] == results["patched"]["losses"] and len(results["plain"]["losses"]) == 6
    assert results["plain"]["sum"] == results["patched"]["sum"]
