"""PEFT's adapter format both ways: PEFT and transformers read what hf_lowrank writes, hf_lowrank reads what PEFT
writes, with the same outputs and without warnings from PEFT. peft is a test-only dependency here.

Cases: plain LoRA, rsLoRA, rank/alpha patterns, modules_to_save (a BERT classification head); fp32, bf16 and NF4
bases.
Each comparison also checks that the adapter changes the output (B is randomised first), so equality is not trivial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings

import pytest
import torch
from conftest import randomize_b, tokens

import hf_lowrank
from hf_lowrank.inject import saved_modules
from hf_lowrank.state import load_adapter, save_adapter

peft = pytest.importorskip("peft")

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32}),
}
BERT_CASE = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])

#: transformers' own deprecation notice, raised whenever PEFT asks any model about gradient checkpointing; it does
#: not depend on the adapter (PEFT's own adapters trigger it too), so it is the one warning not counted.
UNRELATED = ("`is_gradient_checkpointing` is deprecated",)


@contextlib.contextmanager
def no_warnings():
    """Fail when PEFT or transformers warns (Python warnings or their loggers) inside the block."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    records += [f"{w.category.__name__}: {w.message}" for w in caught if not str(w.message).startswith(UNRELATED)]
    assert records == [], f"warnings while loading: {records}"


BASES = ["fp32", "bf16", "nf4"]
#: bf16 bases: PEFT adds the float32 LoRA output before rounding to bf16, hf_lowrank rounds it first (as the base's
#: output dtype); that is one bf16 ulp (2^-8 relative) per layer at most.
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "nf4": 1e-5}


def lowrank_cfg(case: dict, base: str) -> hf_lowrank.LowRankConfig:
    # float32 compute keeps the NF4 comparison tight; the NF4 codes are the same whatever the compute dtype
    return hf_lowrank.LowRankConfig(**case, lora_dropout=0.0, quantization="nf4" if base == "nf4" else None,
                                    compute_dtype="float32")


def ours_model(cls, path, case: dict, base: str):
    kwargs = {"dtype": torch.bfloat16} if base == "bf16" else {}
    return hf_lowrank.from_pretrained(cls, path, lowrank_cfg(case, base), **kwargs)


def base_model(cls, path, base: str):
    """The plain transformers base PEFT works on: fp32, bf16, or NF4 with the BitsAndBytesConfig hf_lowrank uses."""
    if base != "nf4":
        return cls.from_pretrained(path, dtype=torch.bfloat16 if base == "bf16" else torch.float32)
    from hf_lowrank.quantize import bnb_config

    model = cls.from_pretrained(path, quantization_config=bnb_config(lowrank_cfg(CASES["plain"], "nf4")),
                                dtype=torch.float32, device_map={"": "cpu"})
    for module in model.modules():  # the same CPU kernel hf_lowrank selects (see layers.LoraLinear)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def randomise_peft(model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def randomise_ours(model, seed: int = 1, std: float = 0.05) -> None:
    randomize_b(model, seed, std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in saved_modules(model):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits.float()


def assert_same(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, tol: float = 1e-5) -> None:
    """a ≈ b to `tol` relative to the logits' scale, and the adapter moves the output by far more than that."""
    atol = tol * max(b.abs().max().item(), 1e-2)
    assert (a - base).abs().max() > max(1e-3, 3 * atol), "the adapter barely changes the output: a trivial comparison"
    torch.testing.assert_close(a, b, rtol=tol, atol=atol)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(CASES))
def test_ours_load_in_peft(tiny_llama, tmp_path, case, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = tokens()
    ours = ours_model(AutoModelForCausalLM, tiny_llama, CASES[case], base)
    randomise_ours(ours)
    expected = logits(ours, x)
    with hf_lowrank.disabled_adapters(ours):
        base_out = logits(ours, x)
    save_adapter(ours, tmp_path)

    plain = base_model(AutoModelForCausalLM, tiny_llama, base)
    with no_warnings():
        peft_model = PeftModel.from_pretrained(plain, tmp_path)
    assert_same(logits(peft_model, x), expected, base_out, TOLERANCE[base])


@pytest.mark.parametrize("case", ["plain", "patterns"])
def test_ours_load_in_transformers_load_adapter(tiny_llama, tmp_path, case):
    from transformers import AutoModelForCausalLM

    x = tokens()
    ours = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, lowrank_cfg(CASES[case], "fp32"))
    randomise_ours(ours)
    expected = logits(ours, x)
    save_adapter(ours, tmp_path)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base_out = logits(model, x)
    with no_warnings():
        model.load_adapter(str(tmp_path))
    assert_same(logits(model, x), expected, base_out)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_written_loads_in_hf_lowrank(tiny_llama, tmp_path, case, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    x = tokens()
    peft_model = get_peft_model(base_model(AutoModelForCausalLM, tiny_llama, base),
                                LoraConfig(**CASES[case], lora_dropout=0.0, task_type="CAUSAL_LM"))
    randomise_peft(peft_model)
    expected = logits(peft_model, x)
    with peft_model.disable_adapter():
        base_out = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)

    if base == "nf4":  # a 4-bit base with adapters injected from our config, then the PEFT file loaded strictly
        ours = ours_model(AutoModelForCausalLM, tiny_llama, CASES[case], base)
        load_adapter(ours, tmp_path)
    else:  # a plain model: load_adapter injects from the file's config
        ours = load_adapter(base_model(AutoModelForCausalLM, tiny_llama, base), tmp_path)
    assert_same(logits(ours, x), expected, base_out, TOLERANCE[base])


@pytest.mark.parametrize("base", BASES)
def test_modules_to_save_both_ways(tiny_bert, tmp_path, base):
    """A BERT sequence-classification head saved in full: keys as PEFT writes them, and outputs both ways."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification as Cls

    x = tokens()
    torch.manual_seed(0)
    ours = ours_model(Cls, tiny_bert, BERT_CASE, base)
    randomise_ours(ours, std=0.5)  # BERT's logits are small: a large update keeps the comparison meaningful
    expected = logits(ours, x)
    with hf_lowrank.disabled_adapters(ours):
        lora_off = logits(ours, x)
    save_adapter(ours, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        heads = sorted(k for k in f.keys() if "lora_" not in k)  # noqa: SIM118
    assert heads == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]

    torch.manual_seed(123)  # a different fresh head: the saved one must replace it
    fresh = base_model(Cls, tiny_bert, base)
    with no_warnings():
        peft_model = PeftModel.from_pretrained(fresh, tmp_path / "ours")
    assert_same(logits(peft_model, x), expected, lora_off, TOLERANCE[base])

    torch.manual_seed(7)
    written = get_peft_model(base_model(Cls, tiny_bert, base), LoraConfig(**BERT_CASE, task_type="SEQ_CLS"))
    randomise_peft(written, seed=3, std=0.5)
    expected = logits(written, x)
    written.save_pretrained(tmp_path / "peft")
    torch.manual_seed(8)
    ours = ours_model(Cls, tiny_bert, BERT_CASE, base) if base == "nf4" else base_model(Cls, tiny_bert, base)
    before = logits(ours, x)
    assert_same(logits(load_adapter(ours, tmp_path / "peft"), x), expected, before, TOLERANCE[base])


def test_config_has_only_peft_fields(tiny_llama, tmp_path):
    """Every key of our adapter_config.json is a LoraConfig field (unknown keys make PEFT warn)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    save_adapter(hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, lowrank_cfg(CASES["patterns"], "fp32")),
                 tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(LoraConfig)}
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["rank_pattern"] == {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}


def test_load_rebuilds_base(tiny_llama, tmp_path):
    """hf_lowrank.load: NF4 base from our metadata; a 16-bit base (quantization None) for a PEFT-written adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    x = tokens()
    ours = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, lowrank_cfg(CASES["plain"], "nf4"))
    randomise_ours(ours)
    expected = logits(ours, x)
    save_adapter(ours, tmp_path / "ours")
    loaded = hf_lowrank.load(AutoModelForCausalLM, str(tmp_path / "ours"))
    assert type(loaded.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert loaded.lowrank_config.quantization == "nf4" and loaded.lowrank_config.compute_dtype == "float32"
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-5)

    written = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                             LoraConfig(**CASES["plain"], task_type="CAUSAL_LM"))
    randomise_peft(written)
    expected = logits(written, x)
    written.save_pretrained(tmp_path / "peft")
    loaded = hf_lowrank.load(AutoModelForCausalLM, str(tmp_path / "peft"))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base_layer, torch.nn.Linear)
    assert loaded.lowrank_config.quantization is None
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-5)
