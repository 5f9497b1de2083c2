"""Merge (in Python and `hf-lowrank merge`, shard by shard), `hf-lowrank inspect` and `hf-lowrank export`.

Drift tolerances (max |Δlogits| / max |logits| between the adapter model and its merged copy):
  16-bit base, float32: ≤ 1e-5 (only float rounding of W0 + s·B·A);
  NF4 base, float32 compute: ≤ 1e-5 (the merge is onto exactly the dequantized weights the adapter trained against);
  NF4 base, bfloat16 compute (QLoRA's default): ≤ 2e-2, the bfloat16 rounding of the merged weights
  (bfloat16 keeps 8 bits of mantissa: 2^-8 ≈ 4e-3 per value).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import logits, randomize_b, tokens  # noqa: F401

import hf_lowrank
from hf_lowrank.export import merge_main, sample_input
from hf_lowrank.runtimes import ACCEPTED, NEEDS_EXPORT, REFUSED, export, export_main, inspect_main, verdicts
from hf_lowrank.state import AdapterError, load_adapter, read_adapter, save_adapter


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
    """The description, and one verdict per runtime (tests/test_serving.py checks them against the real engines)."""
    save_adapter(adapted(tiny_llama, r=8, target_modules=["q_proj", "v_proj"]), tmp_path / "plain")
    assert inspect_main([str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"r / lora_alpha\s+8 / 8", out) and re.search(r"targets\s+q_proj, v_proj\s+\(4 modules\)", out)
    assert re.search(r"parameters\s+7,168 \(float32\)", out)  # 2 layers × 8 × ((128 + 128) + (128 + 64))
    assert re.search(r"bytes\s+28,672 in tensors", out) and f"base model      {tiny_llama}" in out
    assert re.search(r"^  PEFT\s+accepted\s", out, re.M)
    assert re.search(r"^  vLLM\s+accepted\s+LLM\(.*max_lora_rank=8\)", out, re.M)
    assert re.search(r"^  llama\.cpp\s+accepted\s+hf-lowrank export ADAPTER --target llama\.cpp", out, re.M)

    save_adapter(adapted(tiny_llama, use_rslora=True, rank_pattern={"q_proj": 8}), tmp_path / "fancy")
    assert inspect_main([str(tmp_path / "fancy")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  vLLM\s+accepted\s.*max_lora_rank=8", out, re.M)  # vLLM applies rsLoRA and patterns
    assert re.search(r"^  llama\.cpp\s+needs export\s+llama\.cpp applies one lora_alpha / rank.*rsLoRA's α/√r.*"
                     r"→ hf-lowrank export ADAPTER --target llama\.cpp", out, re.M)
    assert "ranks used      4, 8" in out

    save_adapter(adapted(tiny_bert, cls_name="AutoModelForSequenceClassification", target_modules=["query"]),
                 tmp_path / "head")
    assert inspect_main([str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  vLLM\s+refused\s+vLLM serves no LoRA adapters for BertForSequenceClassification → merge "
                     "instead", out, re.M)
    assert re.search(r"^  llama\.cpp\s+refused\s+.*modules_to_save: classifier.*→ merge instead", out, re.M)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    written = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), peft_config)
    written.save_pretrained(tmp_path / "by_peft")
    assert inspect_main([str(tmp_path / "by_peft")]) == 0
    out = capsys.readouterr().out
    assert "written by      another tool" in out and "quantization    not recorded" in out
    assert re.search(r"parameters\s+1,024 \(float32\)", out)  # 2 layers × 2 × (128 + 128)
    assert re.search(r"^  vLLM\s+accepted\s.*max_lora_rank=8", out, re.M)  # rank 2: the smallest setting ≥ 2

    dora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", use_dora=True)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), dora).save_pretrained(tmp_path / "dora")
    assert inspect_main([str(tmp_path / "dora")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  PEFT\s+accepted", out, re.M) and re.search(r"^  vLLM\s+refused\s+vLLM: DoRA", out, re.M)
    assert re.search(r"^  llama\.cpp\s+refused\s+llama\.cpp: DoRA", out, re.M)
    assert inspect_main([str(tmp_path / "dora"), "--export-portable", str(tmp_path / "dora_portable")]) == 1
    assert "DoRA adapters have no single-alpha form" in capsys.readouterr().err
    assert read_adapter(tmp_path / "dora").config.use_dora  # DoRA loads (tests/test_quality.py)


@pytest.mark.parametrize("kw,max_lora_rank,expected", [
    ({}, None, {"vLLM": ACCEPTED, "llama.cpp": ACCEPTED}),
    # llama.cpp scales each pair by α / (its own rank): a rank pattern alone is right as it is, α patterns are not
    ({"rank_pattern": {"q_proj": 8}}, None, {"vLLM": ACCEPTED, "llama.cpp": ACCEPTED}),
    ({"alpha_pattern": {"v_proj": 32}}, None, {"vLLM": ACCEPTED, "llama.cpp": NEEDS_EXPORT}),
    ({"use_rslora": True}, None, {"vLLM": ACCEPTED, "llama.cpp": NEEDS_EXPORT}),
    ({"r": 16, "lora_alpha": 16}, 8, {"vLLM": REFUSED, "llama.cpp": ACCEPTED}),  # above the server's setting
    ({"r": 16, "lora_alpha": 16}, 16, {"vLLM": ACCEPTED, "llama.cpp": ACCEPTED}),
    ({"rank_pattern": {"model.layers.0.self_attn.q_proj": 520}}, None, {"vLLM": REFUSED, "llama.cpp": ACCEPTED}),
    ({"modules_to_save": ["lm_head"]}, None, {"vLLM": REFUSED, "llama.cpp": REFUSED}),
])
def test_verdict_rules(tiny_llama, tmp_path, kw, max_lora_rank, expected):
    save_adapter(adapted(tiny_llama, **kw), tmp_path / "a")
    got = verdicts(read_adapter(tmp_path / "a"), max_lora_rank)
    assert {k: got[k].status for k in expected} == expected and got["PEFT"].status == ACCEPTED
    for v in got.values():
        assert v.status == ACCEPTED or v.fix  # every verdict but "accepted" says what to do instead
    if kw.get("r") == 16 and max_lora_rank == 8:
        assert got["vLLM"].fix == "start vLLM with max_lora_rank=16"
    if 520 in kw.get("rank_pattern", {}).values():
        assert "rank 520 is above the largest max_lora_rank vLLM allows (512)" in got["vLLM"].reason
    if kw.get("modules_to_save"):
        assert "merge instead" in got["vLLM"].fix and "merge instead" in got["llama.cpp"].fix


def test_verdicts_for_architectures_vllm_serves_without_lora(tiny_gpt2, tmp_path, capsys):
    save_adapter(adapted(tiny_gpt2), tmp_path / "gpt2")
    got = verdicts(read_adapter(tmp_path / "gpt2"))
    assert got["vLLM"].status == REFUSED and "GPT2LMHeadModel" in got["vLLM"].reason
    assert got["llama.cpp"].status == ACCEPTED and "convert_lora_to_gguf.py" in got["llama.cpp"].reason
    assert inspect_main([str(tmp_path / "gpt2"), "--max-lora-rank", "12"]) == 1
    assert "max_lora_rank=12 is not a value vLLM accepts" in capsys.readouterr().err


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


# ---- hf-lowrank export --------------------------------------------------------------------------------------------


def test_export_vllm_writes_the_adapter_as_it_is_or_nothing(tiny_llama, tmp_path, capsys):
    save_adapter(adapted(tiny_llama, use_rslora=True, rank_pattern={"q_proj": 8}), tmp_path / "a")
    assert export_main([str(tmp_path / "a"), "--target", "vllm", "--output", str(tmp_path / "v"),
                        "--max-lora-rank", "8"]) == 0
    assert "serve it: LLM(model=BASE, enable_lora=True, max_lora_rank=8)" in capsys.readouterr().out
    original, copy = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "v")
    assert copy.peft_config == original.peft_config  # vLLM applies rsLoRA and patterns: nothing is folded
    assert copy.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(copy.tensors[k], t) for k, t in original.tensors.items())

    save_adapter(adapted(tiny_llama, r=16, lora_alpha=16), tmp_path / "r16")
    assert export_main([str(tmp_path / "r16"), "--target", "vllm", "--output", str(tmp_path / "v16"),
                        "--max-lora-rank", "8"]) == 1
    err = capsys.readouterr().err
    assert "rank 16 is above max_lora_rank=8" in err and "start vLLM with max_lora_rank=16" in err
    save_adapter(adapted(tiny_llama, modules_to_save=["lm_head"]), tmp_path / "head")
    assert export_main([str(tmp_path / "head"), "--target", "vllm", "--output", str(tmp_path / "vh")]) == 1
    assert "merge instead: hf-lowrank merge" in capsys.readouterr().err
    assert not (tmp_path / "v16").exists() and not (tmp_path / "vh").exists()
    assert export_main([str(tmp_path / "a"), "--target", "peft", "--output", str(tmp_path / "a")]) == 1
    assert "is the adapter folder itself" in capsys.readouterr().err


def test_export_peft_is_the_portable_copy(tiny_llama, tmp_path, capsys):
    save_adapter(adapted(tiny_llama, use_rslora=True, alpha_pattern={"v_proj": 32}), tmp_path / "a")
    assert export_main([str(tmp_path / "a"), "--target", "peft", "--output", str(tmp_path / "p")]) == 0
    assert inspect_main([str(tmp_path / "a"), "--export-portable", str(tmp_path / "q")]) == 0  # the same, by alias
    capsys.readouterr()
    p, q = read_adapter(tmp_path / "p"), read_adapter(tmp_path / "q")
    assert p.peft_config == q.peft_config and (p.config.r, p.config.lora_alpha, p.config.use_rslora) == (4, 4, False)
    assert all(torch.equal(p.tensors[k], t) for k, t in q.tensors.items())
    assert verdicts(p)["llama.cpp"].status == ACCEPTED  # what a single-alpha reader computes right


def test_export_peft_reads_default_named_keys(tiny_llama, tmp_path, capsys):
    """A file whose keys carry PEFT's `default` adapter name (`…lora_A.default.weight`, which loading accepts)
    exports too, to PEFT's plain keys, with the same tensors as the plainly keyed file's export."""
    from safetensors.torch import load_file, save_file

    save_adapter(adapted(tiny_llama, alpha_pattern={"v_proj": 32}), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "d")
    plain = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    named = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): t
             for k, t in plain.items()}
    assert named.keys() != plain.keys()
    save_file(named, str(tmp_path / "d" / "adapter_model.safetensors"), metadata={"format": "pt"})
    for src in ("a", "d"):
        assert export_main([str(tmp_path / src), "--target", "peft", "--output", str(tmp_path / f"{src}-p")]) == 0
    capsys.readouterr()
    got, want = read_adapter(tmp_path / "d-p").tensors, read_adapter(tmp_path / "a-p").tensors
    assert got.keys() == want.keys() == plain.keys()
    assert all(torch.equal(got[k], t) for k, t in want.items())


def test_rope_rows_pair_the_rotary_halves():
    """transformers keeps each head's rotary pairs as (first halves | second halves); GGUF puts a pair's two rows
    side by side: HF rows i and d/2 + i become GGUF rows 2i and 2i + 1, head by head."""
    from hf_lowrank.lora_gguf import _rope_rows

    assert _rope_rows(1, 4).tolist() == [0, 2, 1, 3]
    assert _rope_rows(2, 8).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert _rope_rows(4, 128).sort().values.tolist() == list(range(128))


def test_export_llama_cpp_gguf_folds_every_scaling(tiny_llama, tmp_path, capsys):
    """The GGUF LoRA file: llama.cpp's α/r of each pair, applied to the written B', gives back each module's ΔW
    (q/k rows in GGUF's rotary order). Written by renaming a flushed temporary file: no leftovers."""
    import gguf

    from hf_lowrank.lora_gguf import _rope_rows

    model = adapted(tiny_llama, use_rslora=True, rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                    alpha_pattern={"v_proj": 32})
    save_adapter(model, tmp_path / "a")
    assert export_main([str(tmp_path / "a"), "--target", "llama.cpp", "--output", str(tmp_path / "out")]) == 0
    assert "(scalings folded into B)" in capsys.readouterr().out
    path = tmp_path / "out" / "adapter_model.gguf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_model.gguf"]
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(reader.fields["adapter.type"].parts[-1]).decode() == "lora"
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    assert alpha == 8.0  # the adapter's own lora_alpha: unscaled adapters stay bit for bit what the converter writes
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(tensors) == 2 * 14
    for name, layer in hf_lowrank.lora_layers(model):
        layer_id, kind = name.split(".")[2], name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        a, b = tensors[f"blk.{layer_id}.{gname}.weight.lora_a"], tensors[f"blk.{layer_id}.{gname}.weight.lora_b"]
        r = a.shape[0]
        # numpy (r, in) / (out, r), so GGUF's dimensions (listed the other way round) are (in, r) / (r, out)
        assert a.shape == (r, layer.in_features) and b.shape == (layer.out_features, r)
        expected = layer.delta_weight().float()
        if kind in ("q_proj", "k_proj"):
            expected = expected[_rope_rows(4 if kind == "q_proj" else 2, expected.shape[0])]
        torch.testing.assert_close(alpha / r * (b @ a), expected, rtol=1e-5, atol=1e-7)

    assert export_main([str(tmp_path / "a"), "--target", "llama.cpp", "--output", str(tmp_path / "x.gguf")]) == 0
    assert (tmp_path / "x.gguf").is_file() and not list(tmp_path.glob(".x.gguf*"))


def test_export_llama_cpp_refusals(tiny_llama, tiny_gpt2, tmp_path, capsys, monkeypatch):
    save_adapter(adapted(tiny_gpt2), tmp_path / "gpt2")
    assert export_main([str(tmp_path / "gpt2"), "--target", "llama.cpp", "--output", str(tmp_path / "g.gguf")]) == 1
    err = capsys.readouterr().err
    assert "Llama-architecture GGUF only; this base is GPT2LMHeadModel" in err and "--target peft" in err
    save_adapter(adapted(tiny_llama, modules_to_save=["lm_head"]), tmp_path / "head")
    assert export_main([str(tmp_path / "head"), "--target", "llama.cpp", "--output", str(tmp_path / "h.gguf")]) == 1
    assert "merge instead" in capsys.readouterr().err
    save_adapter(adapted(tiny_llama), tmp_path / "plain")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the [gguf] extra were not installed
    with pytest.raises(AdapterError, match=re.escape('pip install "hf-lowrank[gguf]"')):
        export(read_adapter(tmp_path / "plain"), "llama.cpp", tmp_path / "p.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf*"))
