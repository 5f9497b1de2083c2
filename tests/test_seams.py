"""Where transformers 5 assumes `peft` (DESIGN.md §3). Each test fails loudly if transformers moves a seam."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lowrank
from hf_lowrank import LowRankConfig
from tests.conftest import tokens

ROOT = Path(__file__).resolve().parents[1]


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


def test_flagged_save_pretrained_would_take_the_peft_path():
    """The flag sends transformers' save_pretrained to `get_adapter_state_dict`: why models get our own method."""
    from transformers import PreTrainedModel

    src = inspect.getsource(PreTrainedModel.save_pretrained)
    assert "_hf_peft_config_loaded" in src and "get_adapter_state_dict" in src


def test_save_pretrained_writes_adapter_only_without_peft(tiny_llama, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from importlib.machinery import PathFinder
        class NoPeft(PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                return None if name.split('.')[0] == 'peft' else PathFinder.find_spec(name, path, target)
        sys.meta_path = [NoPeft if f is PathFinder else f for f in sys.meta_path]
        import hf_lowrank, os
        from transformers import AutoModelForCausalLM
        m = hf_lowrank.from_pretrained(AutoModelForCausalLM, {tiny_llama!r}, hf_lowrank.LowRankConfig(r=4))
        m.save_pretrained({str(tmp_path / 'a')!r})
        print(sorted(os.listdir({str(tmp_path / 'a')!r})), 'peft' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['README.md', 'adapter_config.json', 'adapter_model.safetensors'] False" in out.stdout


def test_trainer_save_passes_gathered_state_dict_to_save_pretrained():
    src = inspect.getsource(Trainer._save)
    assert "save_pretrained(" in src and "state_dict=state_dict" in src


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
    params = list(inspect.signature(Trainer._load_from_checkpoint.__wrapped__ if hasattr(
        Trainer._load_from_checkpoint, "__wrapped__") else Trainer._load_from_checkpoint).parameters)
    assert params[:3] == ["self", "resume_from_checkpoint", "model"]
    best = Trainer._load_best_model.__wrapped__ if hasattr(Trainer._load_best_model, "__wrapped__") else \
        Trainer._load_best_model
    assert list(inspect.signature(best).parameters) == ["self"]
    src = inspect.getsource(best)
    assert "_is_peft_model(" in src, "transformers now knows other adapter models; revisit seams._load_best_model"


def test_checkpointing_enables_input_grads_for_flagged_models(tiny_llama):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=4, quantization=None))
    model.disable_input_require_grads()
    model.gradient_checkpointing_enable()
    assert model.get_input_embeddings()(tokens()).requires_grad


def test_training_arguments_record_explicit_fields():
    from hf_lowrank import seams

    seams.install()
    args = TrainingArguments(output_dir="x", optim="adamw_torch", report_to=[])
    assert seams.explicit_fields(args) == frozenset({"output_dir", "optim", "report_to"})
    from transformers import Seq2SeqTrainingArguments

    assert "optim" not in seams.explicit_fields(Seq2SeqTrainingArguments(output_dir="x"))
    default = next(f.default for f in __import__("dataclasses").fields(TrainingArguments) if f.name == "optim")
    assert str(getattr(default, "value", default)).startswith("adamw"), default
