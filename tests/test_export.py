"""Merge (in Python and `hf-lowrank merge`, shard by shard), `hf-lowrank inspect` and the portable export.

Drift tolerances (max |Δlogits| / max |logits| between the adapter model and its merged copy):
  16-bit base, float32: ≤ 1e-5 (only float rounding of W0 + s·B·A);
  NF4 base, float32 compute: ≤ 1e-5 (the merge is onto exactly the dequantized weights the adapter trained against);
  NF4 base, bfloat16 compute (QLoRA's default): ≤ 2e-2, the bfloat16 rounding of the merged weights
  (bfloat16 keeps 8 bits of mantissa: 2^-8 ≈ 4e-3 per value).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import logits, randomize_b, tokens  # noqa: F401

import hf_lowrank
from hf_lowrank.export import inspect_main, merge_main, sample_input
from hf_lowrank.state import load_adapter, read_adapter, save_adapter


def adapted(path, seed=1, cls_name="AutoModelForCausalLM", **kw):
    import transformers

    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, quantization=None)
    base.update(kw)
    model = hf_lowrank.from_pretrained(getattr(transformers, cls_name), path, hf_lowrank.LowRankConfig(**base))
    return randomize_b(model, seed)


def relative_drift(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory) -> str:
    """tiny_llama saved in ten shards of ≤ 200 KB."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("llama_sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(path, max_shard_size="200KB")
    return str(path)


# ---- hf_lowrank.merge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_16bit_is_near_exact(tiny_llama, tiny_gpt2, kind):
    model = adapted(tiny_llama if kind == "llama" else tiny_gpt2, use_rslora=True)
    x = tokens()
    expected = logits(model, x)
    with hf_lowrank.disabled_adapters(model):
        assert relative_drift(expected, logits(model, x)) > 1e-3  # the adapter matters
    merged = hf_lowrank.merge(model)
    assert type(merged) is type(model) and not list(hf_lowrank.lora_layers(merged))
    assert relative_drift(expected, logits(merged, x)) <= 1e-5
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=0)  # the input model is unchanged
    assert list(hf_lowrank.lora_layers(model))


@pytest.mark.parametrize("compute_dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_merge_nf4_onto_dequantized_weights(tiny_llama, compute_dtype, tolerance):
    import bitsandbytes.functional as bnbf

    model = adapted(tiny_llama, quantization="nf4", compute_dtype=compute_dtype)
    x = tokens()
    expected = logits(model, x)
    merged = hf_lowrank.merge(model)
    assert merged.dtype == getattr(torch, compute_dtype)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert "quantization_config" not in merged.config.to_dict()
    drift = relative_drift(expected, logits(merged, x))
    assert drift <= tolerance

    if compute_dtype == "bfloat16":  # why not requantize: the same merge stored back in NF4 drifts far more
        requantized = hf_lowrank.merge(model)
        with torch.no_grad():
            for name, _ in hf_lowrank.lora_layers(model):
                w = requantized.get_submodule(name).weight
                q, state = bnbf.quantize_4bit(w.data, blocksize=64, quant_type="nf4", compress_statistics=True)
                w.copy_(bnbf.dequantize_4bit(q, state))
        assert relative_drift(expected, logits(requantized, x)) > 3 * drift


# ---- hf-lowrank merge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_merge_cli_shard_by_shard(sharded_llama, tmp_path, capsys, quantization):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = adapted(sharded_llama, quantization=quantization, alpha_pattern={"v_proj": 16})
    save_adapter(model, tmp_path / "adapter")
    assert merge_main([str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out

    base_index = json.loads((Path(sharded_llama) / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the same ten shards, the same keys in each
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 10
    assert printed.count("  wrote model-") == 10

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    dtype = torch.bfloat16 if quantization else torch.float32
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    in_memory = hf_lowrank.merge(model).state_dict()
    for shard in shards:  # every tensor equals the in-Python merge, bit for bit
        with safe_open(tmp_path / "merged" / shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert torch.equal(f.get_tensor(key), in_memory[key]), key

    drift = re.search(r"max \|Δlogits\| = (\S+), relative = (\S+)", printed)
    assert drift, printed
    assert float(drift.group(2)) <= (2e-2 if quantization else 1e-5)
    x = sample_input(256)  # the printed number is the drift of the written folder against the adapter model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    assert relative_drift(logits(model, x), logits(reloaded, x)) == pytest.approx(float(drift.group(2)), rel=1e-2)


def test_merge_cli_single_file_gpt2(tiny_gpt2, tmp_path, capsys):
    """Conv1D weights (stored in×out) and a single model.safetensors."""
    from safetensors import safe_open

    model = adapted(tiny_gpt2, quantization="nf4")
    save_adapter(model, tmp_path / "adapter")
    assert merge_main([str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert "relative = " in capsys.readouterr().out
    in_memory = hf_lowrank.merge(model, torch.float32).state_dict()
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(k for k in in_memory if k != "lm_head.weight")  # tied to wte
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), in_memory[key]), key


def test_merge_cli_reports_bad_adapter(tmp_path, capsys):
    assert merge_main([str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- inspect and the portable export --------------------------------------------------------------------------------


def test_inspect_describes_and_judges_runtimes(tiny_llama, tiny_bert, tmp_path, capsys):
    save_adapter(adapted(tiny_llama, r=8, target_modules=["q_proj", "v_proj"]), tmp_path / "plain")
    assert inspect_main([str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"r / lora_alpha\s+8 / 8", out) and re.search(r"targets\s+q_proj, v_proj\s+\(4 modules\)", out)
    assert re.search(r"parameters\s+7,168 \(float32\)", out)  # 2 layers × 8 × ((128 + 128) + (128 + 64))
    assert re.search(r"bytes\s+28,672 in tensors", out) and f"base model      {tiny_llama}" in out
    assert re.search(r"vLLM\s+yes", out) and re.search(r"llama\.cpp\s+yes", out) and re.search(r"PEFT\s+yes", out)

    save_adapter(adapted(tiny_llama, use_rslora=True, rank_pattern={"q_proj": 8}), tmp_path / "fancy")
    assert inspect_main([str(tmp_path / "fancy")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"vLLM\s+not as is", out) and re.search(r"llama\.cpp\s+not as is", out)
    assert "ranks used      4, 8" in out

    save_adapter(adapted(tiny_bert, cls_name="AutoModelForSequenceClassification", target_modules=["query"]),
                 tmp_path / "head")
    assert inspect_main([str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"vLLM\s+no: vLLM refuses modules_to_save \(classifier\)", out)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    written = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), peft_config)
    written.save_pretrained(tmp_path / "by_peft")
    assert inspect_main([str(tmp_path / "by_peft")]) == 0
    out = capsys.readouterr().out
    assert "written by      another tool" in out and "quantization    not recorded" in out
    assert re.search(r"parameters\s+1,024 \(float32\)", out)  # 2 layers × 2 × (128 + 128)

    dora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", use_dora=True)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), dora).save_pretrained(tmp_path / "dora")
    assert inspect_main([str(tmp_path / "dora")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"vLLM\s+no: vLLM refuses DoRA", out) and re.search(r"llama\.cpp\s+no: .*DoRA", out)
    assert inspect_main([str(tmp_path / "dora"), "--export-portable", str(tmp_path / "dora_portable")]) == 1
    assert "DoRA adapters have no single-alpha form" in capsys.readouterr().err
    assert read_adapter(tmp_path / "dora").config.use_dora  # DoRA loads (tests/test_quality.py)


def test_portable_export_same_outputs_with_one_alpha(tiny_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = adapted(tiny_llama, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                    rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32})
    x = tokens()
    expected = logits(model, x)
    save_adapter(model, tmp_path / "adapter")
    assert inspect_main([str(tmp_path / "adapter"), "--export-portable", str(tmp_path / "portable")]) == 0
    capsys.readouterr()

    files = read_adapter(tmp_path / "portable")
    pc = files.peft_config
    assert (pc["r"], pc["lora_alpha"], pc["use_rslora"], pc["rank_pattern"], pc["alpha_pattern"]) == (8, 8, False,
                                                                                                       {}, {})
    original = read_adapter(tmp_path / "adapter")
    for key, a in files.tensors.items():  # a single-alpha reader (llama.cpp: alpha / rank of each tensor) ...
        if ".lora_A." not in key:
            continue
        b = files.tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        layer = model.get_submodule(module)
        single_alpha = pc["lora_alpha"] / a.shape[0] * (b @ a)
        torch.testing.assert_close(single_alpha, layer.delta_weight(), rtol=1e-5, atol=1e-7)  # ... gets each ΔW
    assert original.tensors.keys() == files.tensors.keys()

    with torch.no_grad():  # PEFT with the exported config
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "portable")
    torch.testing.assert_close(logits(peft_model.eval(), x), expected, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert relative_drift(expected, logits(plain, x)) > 1e-3
    torch.testing.assert_close(logits(load_adapter(plain, tmp_path / "portable"), x), expected, rtol=1e-5, atol=1e-5)
