"""TRL's trainers on our QLoRA models: the reference is the policy with adapters disabled, never a second model.

Tolerances: reference log-probs vs the model with adapters disabled: identical (same modules, same inputs);
vs a separately loaded NF4 base: ≤ 1e-5 absolute on the logits (the same NF4 codes, the same kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

import hf_lowrank

trl = pytest.importorskip("trl", reason="TRL is a test dependency; install the test extra")
datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_ADAPTER = {"adapter_model.safetensors", "adapter_config.json"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("trl-llama"), "llama", seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    from hf_lowrank.data import build_tokenizer

    return build_tokenizer(vocab_size=256)


def preference_data(n: int = 16):
    rows = [{"prompt": "The baker", "chosen": " bakes bread at dawn", "rejected": " sells old shoes"},
            {"prompt": "A cat", "chosen": " sleeps in the sun", "rejected": " drives a truck"}]
    return datasets.Dataset.from_list([rows[i % 2] for i in range(n)])


def _count_loads(monkeypatch) -> list[str]:
    """Every PreTrainedModel.from_pretrained call from now on (the hook's and any other), by name."""
    from transformers import PreTrainedModel

    calls: list[str] = []
    current = PreTrainedModel.__dict__["from_pretrained"].__func__

    def counting(cls, *args, **kwargs):
        calls.append(str(args[0]) if args else str(kwargs))
        return current(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return calls


def _modules_held(trainer) -> list[torch.nn.Module]:
    return [v for v in vars(trainer).values() if isinstance(v, torch.nn.Module)]


def _dpo_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
                use_cpu=True, logging_steps=1, bf16=False, save_steps=5, max_length=32, seed=0)
    base.update(kw)
    return trl.DPOConfig(**base)


def test_dpo_two_lines_no_second_model_and_exact_reference(base, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf_lowrank.enable(r=8, lora_alpha=16, lora_dropout=0.0)
    torch.manual_seed(0)  # the adapters' A: not whatever the tests before this one left in the global generator
    model = AutoModelForCausalLM.from_pretrained(base)
    loads = _count_loads(monkeypatch)
    trainer = trl.DPOTrainer(model=model, args=_dpo_args(tmp_path / "dpo"), train_dataset=preference_data(),
                             processing_class=tokenizer)
    assert loads == [], "the trainer loaded another model"
    assert type(trainer.ref_model).__name__ == "ReferenceView" and trainer.ref_model.policy is model
    assert list(trainer.ref_model.parameters()) == [] and list(trainer.ref_model.children()) == []
    policy = {id(p) for p in model.parameters()}
    for held in _modules_held(trainer):
        assert {id(p) for p in held.parameters()} <= policy, type(held).__name__
    trainer.train()
    assert loads == []
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(margins) == 10 and sum(margins[-3:]) / 3 > max(margins[:2]) + 0.05, margins
    for step in (5, 10):
        names = {p.name for p in (tmp_path / "dpo" / f"checkpoint-{step}").iterdir()}
        assert names >= CHECKPOINT_ADAPTER and not names & {"model.safetensors", "pytorch_model.bin"}

    x = tokenizer(["The baker bakes bread at dawn"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=x).logits.float()
        with hf_lowrank.disabled_adapters(model):
            disabled = model(input_ids=x).logits.float()
        trained = model(input_ids=x).logits.float()
    hf_lowrank.disable()
    plain = AutoModelForCausalLM.from_pretrained(base, device_map={"": "cpu"}, dtype=torch.bfloat16,
                                                 quantization_config=hf_lowrank.loading.bnb_config(
                                                     model.lowrank_config))
    for module in plain.modules():  # the same kernel as ours: off bitsandbytes' packed CPU path (hf_lowrank.compat)
        hf_lowrank.compat.shield_cpu_repack(module)
    with torch.no_grad():
        real_base = plain(input_ids=x).logits.float()
    assert isinstance(plain.config.quantization_config, BitsAndBytesConfig)
    assert torch.equal(ref, disabled)
    torch.testing.assert_close(ref, real_base, rtol=0, atol=1e-5)
    assert (trained - ref).abs().max() > 1e-2, "training moved the policy away from the reference"


def test_dpo_resume_and_card(base, tokenizer, tmp_path):
    """Resuming from checkpoint-3 of 6 ends at the same adapter as the uninterrupted run; the card names DPO."""
    from safetensors.torch import load_file

    def run(out, resume=None):
        model = hf_lowrank.from_pretrained(__import__("transformers").AutoModelForCausalLM, base,
                                           hf_lowrank.LowRankConfig(r=8, lora_alpha=16, lora_dropout=0.0))
        trainer = trl.DPOTrainer(model=model, args=_dpo_args(out, max_steps=6, save_steps=3),
                                 train_dataset=preference_data(), processing_class=tokenizer,
                                 callbacks=[hf_lowrank.LowRankCallback()])
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        return load_file(str(Path(out) / "adapter_model.safetensors"))

    full = run(tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    __import__("shutil").copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run(resumed_dir, resume=True)
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-5)
    card = (tmp_path / "full" / "README.md").read_text()
    assert "DPO" in card and "library_name: peft" in card and "## LoRA adapter (hf-lowrank)" in card
    assert {p.name for p in (tmp_path / "full").iterdir()} >= CHECKPOINT_ADAPTER
    assert not (tmp_path / "full" / "model.safetensors").exists()


def test_dpo_precomputed_reference_is_the_base(base, tokenizer, tmp_path):
    """With an adapter already trained (B ≠ 0), precomputed reference log-probs are the base's, not the policy's."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import randomize_b

    model = randomize_b(hf_lowrank.from_pretrained(AutoModelForCausalLM, base, hf_lowrank.LowRankConfig(
        r=8, lora_dropout=0.0)), std=0.2).train()
    trainer = trl.DPOTrainer(model=model, args=_dpo_args(tmp_path / "pre", max_steps=1, precompute_ref_log_probs=True,
                                                         save_strategy="no"),
                             train_dataset=preference_data(4), processing_class=tokenizer,
                             callbacks=[hf_lowrank.LowRankCallback()])
    trainer.train()
    ref = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with hf_lowrank.disabled_adapters(model):
        base_chosen, _ = trainer.compute_ref_log_probs(model, batch)
    policy_chosen, _ = trainer.compute_ref_log_probs(model, batch)
    assert ref.shape == (4,) and torch.isfinite(ref).all()
    torch.testing.assert_close(ref, base_chosen.float().cpu(), rtol=0, atol=1e-4)
    assert (ref - policy_chosen.float().cpu()).abs().max() > 1e-2, "the adapter changes the log-probs"


# ---- GRPO / RLOO: on-policy RL with a rule-based reward ------------------------------------------------------------

PROMPTS = ["The baker", "A cat", "The sea", "One day"]


def first_token_reward(completions, completion_ids=None, **kwargs):
    """1 when the completion starts with a token of id < 64 (a quarter of the vocabulary), else 0."""
    return [1.0 if ids and ids[0] < 64 else 0.0 for ids in completion_ids]


def expected_reward(model, tokenizer) -> float:
    """The exact expected reward of the next token after each prompt (no sampling noise)."""
    total = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
            total += probs[:64].sum().item()
    return total / len(PROMPTS)


def _rl_args(cls, out, **kw):
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=16, num_generations=8,
                max_completion_length=1, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, bf16=False,
                save_strategy="no", seed=0)
    base.update(kw)
    return cls(**base)


@pytest.mark.parametrize("beta", [0.1, 0.0])
def test_grpo_no_second_model_and_the_reward_rises(base, tokenizer, tmp_path, monkeypatch, beta):
    """The head trains too (modules_to_save): the reference must then use the original head, not the trained one.
    The adapters' initial A comes from a fixed seed (it came from whatever the tests before left in the global
    generator), and with the KL term the run is 24 steps: at 12, the reward's rise over seeds 0–5 and the suite's
    orders was 0.03–0.20, at 24 over seeds 0–3, 6, 7 it is 0.18–0.63."""
    from transformers import AutoModelForCausalLM

    hf_lowrank.enable(r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=["lm_head"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    loads = _count_loads(monkeypatch)
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS] * 8)
    args = _rl_args(trl.GRPOConfig, tmp_path / "grpo", beta=beta, max_steps=24 if beta else 12)
    trainer = trl.GRPOTrainer(model=model, args=args,
                              train_dataset=data, reward_funcs=[first_token_reward], processing_class=tokenizer)
    assert loads == []
    if beta:
        assert type(trainer.ref_model).__name__ == "ReferenceView" and trainer.ref_model.policy is model
    else:
        assert trainer.ref_model is None  # TRL needs no reference at beta = 0
    before = expected_reward(model, tokenizer)
    trainer.train()
    assert loads == []
    after = expected_reward(model, tokenizer)
    with hf_lowrank.disabled_adapters(model):
        assert expected_reward(model, tokenizer) == pytest.approx(before, abs=1e-6)  # the reference did not move
    assert after > before + 0.05, (before, after)
    if beta:
        kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
        assert kl[0] == pytest.approx(0, abs=1e-6) and max(kl) > 1e-3  # measured against the fixed reference


def test_rloo_trains_against_the_disabled_adapters(base, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, base, hf_lowrank.LowRankConfig(r=8, lora_dropout=0.0))
    loads = _count_loads(monkeypatch)
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS] * 8)
    trainer = trl.RLOOTrainer(model=model, args=_rl_args(trl.RLOOConfig, tmp_path / "rloo", max_steps=4, beta=0.1),
                              train_dataset=data, reward_funcs=[first_token_reward], processing_class=tokenizer,
                              callbacks=[hf_lowrank.LowRankCallback()])
    assert loads == [] and trainer.ref_model.policy is model
    trainer.train()
    _assert_trained_saves_and_loads(model, trainer, tmp_path / "rloo-adapter", base)


def _assert_trained_saves_and_loads(model, trainer, folder, base, cls_name="AutoModelForCausalLM", **load_kwargs):
    import transformers

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 2 and len(set(losses)) > 1, losses
    moved = max(layer.lora_B.weight.abs().max().item() for _, layer in hf_lowrank.lora_layers(model))
    assert moved > 0, "B left zero: nothing trained"
    trainer.save_model(str(folder))
    loaded = hf_lowrank.load(getattr(transformers, cls_name), str(folder), base=base, **load_kwargs)
    got = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name].float(), p.detach().float(), rtol=0, atol=1e-6)


# ---- KTO, ORPO / CPO, reward models --------------------------------------------------------------------------------


def test_kto_trains_against_the_disabled_adapters(base, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, base, hf_lowrank.LowRankConfig(r=8, lora_dropout=0.0))
    loads = _count_loads(monkeypatch)
    rows = [{"prompt": "The baker", "completion": " bakes bread", "label": True},
            {"prompt": "The baker", "completion": " eats rocks", "label": False}]
    data = datasets.Dataset.from_list(rows * 8)
    args = trl.KTOConfig(output_dir=str(tmp_path / "kto"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=5e-3, report_to=[], use_cpu=True, logging_steps=1, bf16=False,
                         save_strategy="no", max_length=32)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[hf_lowrank.LowRankCallback()])
    assert loads == [] and trainer.ref_model.policy is model
    trainer.train()
    _assert_trained_saves_and_loads(model, trainer, tmp_path / "kto-adapter", base)


@pytest.mark.parametrize("name", ["ORPO", "CPO"])
def test_reference_free_preference_trainers(base, tokenizer, tmp_path, name):
    from transformers import AutoModelForCausalLM

    experimental = pytest.importorskip(f"trl.experimental.{name.lower()}")
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, base, hf_lowrank.LowRankConfig(r=8, lora_dropout=0.0))
    config = getattr(experimental, f"{name}Config")(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=[], use_cpu=True, logging_steps=1, bf16=False, save_strategy="no", max_length=32)
    trainer = getattr(experimental, f"{name}Trainer")(model=model, args=config, train_dataset=preference_data(),
                                                      processing_class=tokenizer,
                                                      callbacks=[hf_lowrank.LowRankCallback()])
    trainer.train()
    _assert_trained_saves_and_loads(model, trainer, tmp_path / f"{name}-adapter", base)


def test_reward_model_trains_its_score_head_as_modules_to_save(base, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = hf_lowrank.from_pretrained(AutoModelForSequenceClassification, base,
                                       hf_lowrank.LowRankConfig(r=8, lora_dropout=0.0), num_labels=1)
    assert model.lowrank_config.modules_to_save == ["score"]
    model.config.pad_token_id = tokenizer.pad_token_id
    head_before = model.score.original.weight.detach().clone()
    args = trl.RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=4, per_device_train_batch_size=4,
                            learning_rate=5e-3, report_to=[], use_cpu=True, logging_steps=1, bf16=False,
                            save_strategy="no", max_length=32)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=preference_data(), processing_class=tokenizer,
                                callbacks=[hf_lowrank.LowRankCallback()])
    trainer.train()
    assert (model.score.weight.detach() - head_before).abs().max() > 1e-4, "the score head trains"
    assert torch.equal(model.score.original.weight, head_before), "the original head is kept for the base"
    _assert_trained_saves_and_loads(model, trainer, tmp_path / "rm-adapter", base,
                                    cls_name="AutoModelForSequenceClassification", num_labels=1)
    assert "base_model.model.score.weight" in load_file(str(tmp_path / "rm-adapter" / "adapter_model.safetensors"))


# ---- without peft --------------------------------------------------------------------------------------------------

NO_PEFT_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["peft"] = None  # as on a machine without peft: `import peft` fails
    sys.path.insert(0, {tests!r})
    import datasets, torch, trl
    import hf_lowrank
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from test_trl import PROMPTS, first_token_reward, preference_data
    from hf_lowrank.data import build_tokenizer

    base, out = sys.argv[1], sys.argv[2]
    tok = build_tokenizer(vocab_size=256)
    common = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[], use_cpu=True,
                  logging_steps=1, bf16=False, save_strategy="no")
    hf_lowrank.enable(r=4, lora_dropout=0.0)
    results = {{}}
    def run(name, trainer):
        trainer.train()
        results[name] = [type(getattr(trainer, "ref_model", None)).__name__,
                         len([h for h in trainer.state.log_history if "loss" in h])]
    rl = [{{"prompt": p}} for p in PROMPTS] * 4
    run("dpo", trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), processing_class=tok,
        args=trl.DPOConfig(out + "/dpo", max_length=32, **common), train_dataset=preference_data(8)))
    kto = [{{"prompt": "A", "completion": " b", "label": True}}, {{"prompt": "A", "completion": " c", "label": False}}]
    run("kto", trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(base), processing_class=tok,
        args=trl.KTOConfig(out + "/kto", max_length=32, **common), train_dataset=datasets.Dataset.from_list(kto * 4)))
    for cls, cfg in ((trl.GRPOTrainer, trl.GRPOConfig), (trl.RLOOTrainer, trl.RLOOConfig)):
        run(cls.__name__, cls(model=AutoModelForCausalLM.from_pretrained(base), processing_class=tok,
            reward_funcs=[first_token_reward], train_dataset=datasets.Dataset.from_list(rl),
            args=cfg(out + "/" + cls.__name__, num_generations=4, max_completion_length=4, beta=0.1, **common)))
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    run("reward", trl.RewardTrainer(model=rm, processing_class=tok, train_dataset=preference_data(8),
        args=trl.RewardConfig(out + "/rm", max_length=32, **common)))
    print("RESULT", json.dumps({{"runs": results, "peft": [m for m in sys.modules if m.startswith("peft")
                                                          and sys.modules[m] is not None]}}))
""")


def test_trl_trainers_without_peft(base, tmp_path):
    script = tmp_path / "no_peft.py"
    script.write_text(NO_PEFT_SCRIPT.format(tests=str(ROOT / "tests")))
    out = subprocess.run([sys.executable, str(script), base, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    assert result["peft"] == []
    assert result["runs"] == {"dpo": ["ReferenceView", 2], "kto": ["ReferenceView", 2],
                              "GRPOTrainer": ["ReferenceView", 2], "RLOOTrainer": ["ReferenceView", 2],
                              "reward": ["NoneType", 2]}


@pytest.mark.parametrize(("script", "metric"), [("dpo_qlora.py", "rewards/margins:"),
                                              ("grpo_qlora.py", "mean reward:")])
def test_trl_examples_run_offline_as_written(tmp_path, script, metric):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--max_steps", "2", "--output_dir",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert metric in out.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()
