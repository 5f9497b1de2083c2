"""adapter_config.json fields of the wrong type or size (issue: config inputs). Each is refused with an error that
names the field and the value (an `AdapterError` naming the file, through `read_adapter`), and nothing changes;
`rank_pattern` / `alpha_pattern` dicts are compiled once, bounded in size, and match every module fast."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import hf_lowrank
from hf_lowrank import AdapterError, LowRankConfig, patterns
from hf_lowrank.format import CONFIG_CHECKSUM, CONFIG_NAME, WEIGHTS_NAME
from hf_lowrank.patterns import MAX_PATTERN_LENGTH, first_match
from hf_lowrank.state import load_adapter, read_adapter, save_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    """A 16-bit adapter of the tiny Llama (q_proj and v_proj, v_proj at rank 2) as a tool other than hf_lowrank
    writes it: without our checksum of the config, so the config can be edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = LowRankConfig(r=4, lora_alpha=8, lora_dropout=0.0, quantization=None, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"v_proj": 2})
    folder = save_adapter(hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, config),
                          tmp_path_factory.mktemp("adapter") / "adapter")
    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != CONFIG_CHECKSUM}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    return folder


def edited(adapter: Path, tmp_path: Path, changes: dict) -> Path:
    """A copy of `adapter` whose adapter_config.json has `changes`."""
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    return folder


def plain_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def refused(model, folder: Path, message: str) -> None:
    """Loading `folder` into `model` raises `AdapterError` naming the config file and `message`; `model` is as it
    was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as e:
        load_adapter(model, folder)
    assert str(e.value).startswith(f"{folder / CONFIG_NAME}: "), str(e.value)
    assert message in str(e.value), str(e.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ---- 1. use_rslora / use_dora are JSON booleans (or 0 / 1) -----------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("use_rslora", "false"), ("use_rslora", 2), ("use_dora", "true"),
                                              ("use_dora", "1")])
def test_flags_must_be_json_booleans(tiny_llama, adapter, tmp_path, field, value):
    refused(plain_model(tiny_llama), edited(adapter, tmp_path, {field: value}),
            f"LowRankConfig.{field}={value!r} is not valid: expected True or False.")


def test_json_booleans_and_null_flags_still_load():
    assert LowRankConfig.from_peft_dict({"use_rslora": True, "use_dora": False}).use_rslora is True
    unset = LowRankConfig.from_peft_dict({"use_rslora": None, "use_dora": None})  # null: PEFT's unset, i.e. False
    assert unset.use_rslora is False and unset.use_dora is False


# ---- 2. fields of the wrong type are named, with their value ------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("rank_pattern", 5), ("rank_pattern", "ab"), ("rank_pattern", [["q_proj", 2]]), ("rank_pattern", {"q_proj": 2.5}),
    ("alpha_pattern", 3), ("alpha_pattern", {"q_proj": "16"}), ("alpha_pattern", {"q_proj": True}),
    ("target_modules", [1, "q_proj"]), ("target_modules", 7), ("target_modules", []), ("exclude_modules", [1]),
    ("modules_to_save", 5), ("modules_to_save", "lm_head"),
])
def test_wrong_types_are_refused_naming_field_and_value(tiny_llama, adapter, tmp_path, field, value):
    refused(plain_model(tiny_llama), edited(adapter, tmp_path, {field: value}),
            f"LowRankConfig.{field}={value!r} is not valid: expected ")


def test_huge_bad_values_give_short_messages():
    with pytest.raises(ValueError, match=r"LowRankConfig.rank_pattern='aaaa.*\.\.\. \(1,000,002 characters\) is not "
                                         "valid") as e:
        LowRankConfig.from_peft_dict({"rank_pattern": "a" * 1_000_000})
    assert len(str(e.value)) < 400


# ---- 3. pattern dicts are bounded and compiled once ---------------------------------------------------------------


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_dicts_with_too_many_keys_are_refused(tiny_llama, adapter, tmp_path, field):
    too_many = {**{f"model.nowhere.{i}": 2 for i in range(4_096)}, "v_proj": 2}  # v_proj: the tensors' rank
    refused(plain_model(tiny_llama), edited(adapter, tmp_path / "over", {field: too_many}),
            f"LowRankConfig.{field} is not valid: 4,097 keys given; at most 4,096 are accepted.")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"LowRankConfig.{field} is not valid: 70,000 keys given; at most 4,096"):
        LowRankConfig.from_peft_dict({field: {f"k{i}": 2 for i in range(70_000)}})  # ~0.9 MB: under the file cap
    assert time.perf_counter() - start < 1, "refused before any key is compiled"
    assert patterns.MAX_PATTERN_KEYS == 4_096
    at_limit = dict(list(too_many.items())[1:])
    model = load_adapter(plain_model(tiny_llama), edited(adapter, tmp_path / "at", {field: at_limit}))
    assert model.lowrank_config.rank_for("model.layers.1.self_attn.v_proj") == 2


def test_pattern_dicts_that_compile_too_large_are_refused():
    # each key compiles to ~128,000 RE2 instructions (each alone is accepted): 4,096 such would take ~50 s and 4 GB
    big = {"(?:[^.]{999})" * 16 + f"|k{i}": 2 for i in range(20)}
    LowRankConfig(rank_pattern=dict(list(big.items())[:1]))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="LowRankConfig.rank_pattern is not valid: the keys compile to more than "
                                         "1,048,576 RE2 instructions together"):
        LowRankConfig.from_peft_dict({"rank_pattern": big})
    assert time.perf_counter() - start < 5


def test_a_large_realistic_rank_pattern_matches_fast():
    """1,000 keys (full module names) over 500 modules, half of them matched, asked as inject and load ask: each
    name once per pass, three passes. Before: ~30 ms a call (the keys recompiled each call), minutes in all."""
    keys = [f"model.layers.{i}.self_attn.q_proj" for i in range(1000)]
    names = [f"model.layers.{i}.{m}" for i in range(250) for m in ("self_attn.q_proj", "mlp.up_proj")]
    start = time.perf_counter()
    config = LowRankConfig(quantization=None, rank_pattern=dict.fromkeys(keys, 8), alpha_pattern=dict.fromkeys(keys, 4))
    for _ in range(3):
        for name in names:
            assert (config.rank_for(name), config.alpha_for(name)) == ((8, 4) if "q_proj" in name else (16, 32))
            assert time.perf_counter() - start < 10, "too slow"
    assert time.perf_counter() - start < 5


def test_rank_pattern_matching_is_peft_s():
    """The first key that matches the whole name or a dotted suffix, as PEFT's ``fullmatch(key) or
    search((^|\\.)key$)`` (here with Python's `re`) finds it, whatever the keys' order."""
    keys = ["q_proj", r"layers\.0\..*", "^model.layers.1.mlp.down_proj$", "proj", r".*\.1\..*_proj",
            "self_attn.v_proj", "model", "k_proj|o_proj", "(?i:UP_PROJ)", r"\bgate_proj"]
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    names += ["xq_proj", "q_proj", "model", "lm_head", "a.b.c_proj", "a.bgate_proj"]
    for i in range(len(keys)):
        rotated = keys[i:] + keys[:i]
        for name in names:
            peft = next((j for j, k in enumerate(rotated)
                         if re.fullmatch(k, name) or re.search(rf"(^|\.)(?:{k})$", name)), None)
            assert first_match({k: j for j, k in enumerate(rotated)}, name, None) == peft, (name, rotated)


def test_a_key_that_escapes_its_wrapping_is_refused():
    with pytest.raises(ValueError, match=r"LowRankConfig.rank_pattern is not valid: pattern 'q_proj\)\|\(v_proj'"):
        LowRankConfig.from_peft_dict({"rank_pattern": {"q_proj)|(v_proj": 2}})


# ---- 4. the length limit is the key's, checked when the config is built -------------------------------------------


def test_a_key_at_the_length_limit_loads_and_one_over_is_refused(tiny_llama, adapter, tmp_path):
    key = "v_proj|" + "x" * (MAX_PATTERN_LENGTH - 7)  # matches v_proj (rank 2 in the tensors): exactly the limit
    model = load_adapter(plain_model(tiny_llama), edited(adapter, tmp_path / "at", {"rank_pattern": {key: 2}}))
    assert [layer.r for _, layer in hf_lowrank.lora_layers(model)] == [4, 2, 4, 2]
    assert read_adapter(edited(adapter, tmp_path / "again", {"rank_pattern": {key: 2}})).config.rank_for(
        "model.layers.0.self_attn.v_proj") == 2
    refused(plain_model(tiny_llama), edited(adapter, tmp_path / "over", {"rank_pattern": {key + "x": 2}}),
            f"LowRankConfig.rank_pattern is not valid: pattern {key[:40]!r}... is 2,001 characters long; at most "
            "2,000 are accepted.")


def test_flags_saved_as_0_or_1_and_name_sets_are_accepted():
    """Earlier saves wrote `"use_rslora": 1` (a config built with use_rslora=1): 0 and 1 read as the flags they
    meant; a set of names (built in code) becomes a sorted list. A string flag is still refused."""
    cfg = LowRankConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": 1, "use_dora": 0})
    assert cfg.use_rslora is True and cfg.use_dora is False
    assert LowRankConfig(modules_to_save={"score", "classifier"}).modules_to_save == ["classifier", "score"]
    with pytest.raises(ValueError, match="use_rslora='false'"):
        LowRankConfig.from_peft_dict({"peft_type": "LORA", "use_rslora": "false"})
