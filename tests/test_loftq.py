"""init="loftq": A and B from the SVD of each layer's NF4 error (the base stays standard NF4).

Tolerances: on a tiny Llama whose weights are larger than their init (std 0.2, so NF4's error matters), with float32
compute, KL(16-bit ‖ QLoRA) at initialisation is at least 1.8× lower than with the plain init at r=32 (measured
2.4×) and lower at r=8; every layer's error ratio ‖W − (dequant(Q) + s·B·A)‖ / ‖W − dequant(Q)‖ is below 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Motifs, llama_config, tokens
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import hf_lowrank


@pytest.fixture(scope="module")
def heavy_llama(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("heavy-llama")
    model.save_pretrained(path)
    return str(path)


def _kl(model, x, reference) -> float:
    with torch.no_grad():
        q = model.eval()(x).logits.float().log_softmax(-1)
    return F.kl_div(q, reference, log_target=True, reduction="batchmean").item()


def _load(path, **kw):
    cfg = hf_lowrank.LowRankConfig(**{"lora_alpha": 16, "lora_dropout": 0.0, "compute_dtype": "float32", **kw})
    return hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg)


def test_loftq_starts_closer_to_the_16_bit_model(heavy_llama, tmp_path):
    x = tokens(2, 32)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(heavy_llama, dtype=torch.float32)(x).logits.float()
    reference = reference.log_softmax(-1)
    plain = _kl(_load(heavy_llama, r=32), x, reference)
    results = {}
    for r in (8, 32):
        model = _load(heavy_llama, r=r, init="loftq")
        ratios = model.loftq_error_ratios
        assert len(ratios) == 14 and all(0 < v < 1 for v in ratios.values()), ratios
        results[r] = (_kl(model, x, reference), max(ratios.values()))
    assert results[32][0] * 1.8 <= plain, (plain, results)
    assert results[8][0] < plain and results[32][1] < results[8][1], results  # more rank, less error left
    assert all(type(m.base_layer).__name__ == "Linear4bit" for _, m in hf_lowrank.lora_layers(model))

    hf_lowrank.save_adapter(model, tmp_path / "a")  # a plain LoRA file: any reader gets the same model
    loaded = hf_lowrank.load(AutoModelForCausalLM, str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=1e-5)
    import json

    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_loftq_needs_the_checkpoint_weights(tmp_path):
    from hf_lowrank.loftq import loftq_plan

    with pytest.raises(ValueError, match="reads the 16-bit weights from safetensors"):
        loftq_plan(torch.nn.Linear(4, 4), tmp_path, [])


def _plain_nf4(path, cfg):
    from hf_lowrank.quantize import bnb_config

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(cfg), dtype=torch.float32,
                                                 device_map={"": "cpu"})
    for module in model.modules():  # the CPU kernel hf_lowrank selects (see layers.LoraLinear)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _heavy(path, kind: str) -> str:
    from conftest import gpt2_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()) if kind == "llama" else GPT2LMHeadModel(gpt2_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loftq_merge_carries_the_fix_llama_and_conv1d(kind, tmp_path):
    """Merged into 16 bits, each weight is as close to the original W as the reported error ratio says (GPT-2's
    Conv1D weights are stored (in, out): the SVD must be of the transposed error)."""
    from safetensors.torch import load_file

    path = _heavy(tmp_path / kind, kind)
    model = _load(path, r=16, init="loftq")
    plain = hf_lowrank.merge(_load(path, r=16), torch.float32).state_dict()  # = dequant(Q): B = 0
    merged = hf_lowrank.merge(model, torch.float32).state_dict()
    original = load_file(f"{path}/model.safetensors")
    ratios = model.loftq_error_ratios
    assert len(ratios) == (14 if kind == "llama" else 8) and all(0 < v < 1 for v in ratios.values()), ratios
    for name, ratio in ratios.items():
        w = original[f"{name}.weight"]
        got = (w - merged[f"{name}.weight"]).norm() / (w - plain[f"{name}.weight"]).norm()
        assert got.item() == pytest.approx(ratio, rel=1e-3), name


def test_loftq_with_dora_starts_where_loftq_does_and_peft_reads_it(heavy_llama, tmp_path):
    """DoRA's magnitude is set after the LoftQ fix (m = ‖W0 + s·B·A‖), so DoRA + LoftQ starts at LoftQ's outputs;
    PEFT loads either adapter over its own NF4 base with equal outputs."""
    from peft import PeftModel

    x = tokens(2, 16)
    loftq = _load(heavy_llama, r=8, init="loftq")
    dora = _load(heavy_llama, r=8, init="loftq", use_dora=True)
    with torch.no_grad():
        want = loftq.eval()(x).logits
        base = _plain_nf4(heavy_llama, loftq.lowrank_config)(x).logits
        torch.testing.assert_close(dora.eval()(x).logits, want, rtol=0, atol=1e-4)
    assert (want - base).abs().max() > 0.05  # the LoftQ fix changes the outputs
    for name, model in (("loftq", loftq), ("dora", dora)):
        model.save_pretrained(tmp_path / name)
        peft_model = PeftModel.from_pretrained(_plain_nf4(heavy_llama, model.lowrank_config), tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(peft_model.eval()(x).logits, want, rtol=0, atol=1e-4)


def test_loftq_on_a_model_you_loaded_and_bad_sources(heavy_llama, tmp_path):
    """`inject` with init="loftq" reads the checkpoint the model came from (its name_or_path); a checkpoint lacking
    a 4-bit layer's weight, a model with no source and an unquantized base are refused, naming what is wrong."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = hf_lowrank.LowRankConfig(r=8, lora_alpha=16, init="loftq", compute_dtype="float32")
    mine = hf_lowrank.inject(_plain_nf4(heavy_llama, cfg), cfg)
    want = _load(heavy_llama, r=8, init="loftq").loftq_error_ratios
    assert mine.loftq_error_ratios.keys() == want.keys()
    assert all(mine.loftq_error_ratios[k] == pytest.approx(v, abs=1e-6) for k, v in want.items())

    lacking = tmp_path / "lacking"
    shutil.copytree(heavy_llama, lacking)
    weights = load_file(lacking / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, lacking / "model.safetensors", metadata={"format": "pt"})
    moved = _plain_nf4(heavy_llama, cfg)  # its source changed since: a 4-bit layer's W is no longer there
    moved.name_or_path = str(lacking)
    before = {n: (p.requires_grad, p.data_ptr()) for n, p in moved.named_parameters()}
    with pytest.raises(ValueError, match=r"init='loftq': model\.layers\.1\.mlp\.up_proj\.weight is not in"):
        hf_lowrank.inject(moved, cfg)
    assert {n: (p.requires_grad, p.data_ptr()) for n, p in moved.named_parameters()} == before  # nothing changed

    nameless = _plain_nf4(heavy_llama, cfg)
    nameless.name_or_path = ""
    with pytest.raises(ValueError, match=r"model\.name_or_path is empty"):
        hf_lowrank.inject(nameless, cfg)
    nowhere = _plain_nf4(heavy_llama, cfg)
    nowhere.name_or_path = "someone/not-in-the-cache"
    with pytest.raises(ValueError, match=r"'someone/not-in-the-cache' is neither a local folder nor in the Hub cache"):
        hf_lowrank.inject(nowhere, cfg)
    with pytest.raises(ValueError, match=r"LowRankConfig\.init='loftq' is not valid.*quantization=None"):
        hf_lowrank.LowRankConfig(init="loftq", quantization=None)


@pytest.mark.parametrize("api", ["two lines", "explicit"])
def test_dora_and_loftq_through_the_trainer_checkpoints_and_resume(heavy_llama, tmp_path, api):
    """DoRA over NF4 with the LoftQ init, under the two lines and with from_pretrained + LowRankCallback:
    checkpoints hold A, B and the magnitudes (m trains), resuming ends at the uninterrupted run's adapter."""
    from transformers import Trainer, TrainingArguments

    from hf_lowrank.inject import adapter_modules
    from hf_lowrank.state import read_adapter

    kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, init="loftq", use_dora=True, compute_dtype="float32")

    def run(out, resume=None, **args):
        torch.manual_seed(0)
        if api == "two lines":
            hf_lowrank.enable(**kw)
            model, callbacks = AutoModelForCausalLM.from_pretrained(heavy_llama), []
        else:
            model = hf_lowrank.from_pretrained(AutoModelForCausalLM, heavy_llama, hf_lowrank.LowRankConfig(**kw))
            callbacks = [hf_lowrank.LowRankCallback()]
        assert len(model.loftq_error_ratios) == 14
        start = {k: p.detach().clone() for k, p in adapter_modules(model).parameters().items()}
        args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, learning_rate=1e-2, logging_steps=1, optim="adamw_torch", **args)
        Trainer(model=model, args=args, train_dataset=Motifs(16), callbacks=callbacks).train(
            resume_from_checkpoint=resume)
        return start, {k: p.detach().clone() for k, p in adapter_modules(model).parameters().items()}

    start, full = run(tmp_path / "full", save_strategy="steps", save_steps=2)
    _, resumed = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"), save_strategy="no")
    magnitudes = [k for k in full if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14
    assert all(start[k].abs().max() > 0 for k in full if k.endswith("lora_B.weight"))  # LoftQ: B starts non-zero
    assert all(not torch.equal(start[k], full[k]) for k in magnitudes)  # m trains
    halfway = read_adapter(tmp_path / "full" / "checkpoint-2")
    assert halfway.config.use_dora and {k.removeprefix("base_model.model.") for k in halfway.tensors} == set(full)
    assert any(not torch.equal(t, full[k.removeprefix("base_model.model.")]) for k, t in halfway.tensors.items())
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
