"""Adapter files: exact keys and header, round trips, strict loading that never half-loads, all-or-nothing saves."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import logits, randomize_b, save_tiny, tokens  # noqa: F401

import hf_lowrank
from hf_lowrank.state import AdapterError, load_adapter, read_adapter, save_adapter

LLAMA_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
GPT2_MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
METADATA_KEYS = {"format", "hf_lowrank.version", "hf_lowrank.base_model", "hf_lowrank.base_revision",
                 "hf_lowrank.base_architecture", "hf_lowrank.quantization", "hf_lowrank.fingerprint",
                 "hf_lowrank.modules", "hf_lowrank.checksum", "hf_lowrank.config_checksum"}


def cfg(**kw) -> hf_lowrank.LowRankConfig:
    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, quantization=None)
    base.update(kw)
    return hf_lowrank.LowRankConfig(**base)


def adapted(path, config, cls_name="AutoModelForCausalLM", seed=1):
    """A model with adapters whose B is random (so the adapter changes the output)."""
    import transformers

    model = hf_lowrank.from_pretrained(getattr(transformers, cls_name), path, config)
    return randomize_b(model, seed)


def tensors_of(folder):
    from safetensors import safe_open

    with safe_open(Path(folder) / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


# ---- format ------------------------------------------------------------------------------------------------------


def test_llama_keys_shapes_and_header(tiny_llama, tmp_path):
    model = adapted(tiny_llama, cfg(r=8))
    save_adapter(model, tmp_path, training_summary={"steps": 3})
    tensors, meta = tensors_of(tmp_path)
    expected = sorted(f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
                      for i in range(2) for m in LLAMA_MODULES for ab in "AB")
    assert sorted(tensors) == expected
    assert len(expected) == 28
    out_in = {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128),
              "gate_proj": (256, 128), "up_proj": (256, 128), "down_proj": (128, 256)}
    for key, t in tensors.items():
        out_f, in_f = out_in[key.split(".")[-3]]
        assert tuple(t.shape) == ((8, in_f) if ".lora_A." in key else (out_f, 8)), key
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert set(meta) == METADATA_KEYS | {"hf_lowrank.training"}
    assert meta["format"] == "pt" and meta["hf_lowrank.version"] == hf_lowrank.__version__
    assert meta["hf_lowrank.base_model"] == ""  # a local path is never written into the header (it is published)
    assert meta["hf_lowrank.base_architecture"] == "LlamaForCausalLM"
    assert json.loads(meta["hf_lowrank.quantization"]) == {"quantization": None}
    assert json.loads(meta["hf_lowrank.modules"])["model.layers.0.self_attn.k_proj"] == [64, 128]
    assert json.loads(meta["hf_lowrank.training"]) == {"steps": 3}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(m.split(".")[-1] for m in LLAMA_MODULES)
    assert config["base_model_name_or_path"] == tiny_llama and config["r"] == 8
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "steps" in card


def test_gpt2_keys_and_conv1d_shapes(tiny_gpt2, tmp_path):
    model = adapted(tiny_gpt2, cfg())
    save_adapter(model, tmp_path)
    tensors, meta = tensors_of(tmp_path)
    assert sorted(tensors) == sorted(f"base_model.model.transformer.h.{i}.{m}.lora_{ab}.weight"
                                     for i in range(2) for m in GPT2_MODULES for ab in "AB")
    # Conv1D stores its weight (in, out); LoRA's A and B are still r×in and out×r, as PEFT writes them
    assert tuple(tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape) == (4, 128)
    assert tuple(tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape) == (384, 4)
    assert tuple(tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape) == (4, 512)
    assert set(meta) == METADATA_KEYS
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"  # GPT2LMHeadModel is a causal LM


def test_bfloat16_halves_the_tensor_bytes(tiny_llama, tmp_path):
    model = adapted(tiny_llama, cfg(r=8))
    save_adapter(model, tmp_path / "fp32")
    save_adapter(model, tmp_path / "bf16", dtype=torch.bfloat16)
    full, _ = tensors_of(tmp_path / "fp32")
    half, _ = tensors_of(tmp_path / "bf16")
    tensor_bytes = {k: sum(t.numel() * t.element_size() for t in d.values()) for k, d in (("fp32", full),
                                                                                          ("bf16", half))}
    assert tensor_bytes["bf16"] * 2 == tensor_bytes["fp32"] == 32768 * 4
    for name in ("fp32", "bf16"):  # the file is the tensors plus a small header
        header = (tmp_path / name / "adapter_model.safetensors").stat().st_size - tensor_bytes[name]
        assert 0 < header < 8192
    for k in full:
        assert half[k].dtype == torch.bfloat16
        torch.testing.assert_close(half[k].float(), full[k], rtol=1e-2, atol=1e-6)


# ---- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,quantization", [("llama", None), ("gpt2", None), ("llama", "nf4")])
def test_round_trip(tiny_llama, tiny_gpt2, tmp_path, kind, quantization):
    path = tiny_llama if kind == "llama" else tiny_gpt2
    config = cfg(quantization=quantization, use_rslora=True, alpha_pattern={"layers.1.*": 4.0})
    x = tokens()
    model = adapted(path, config, seed=1)
    expected = logits(model, x)
    with hf_lowrank.disabled_adapters(model):
        base_out = logits(model, x)
    save_adapter(model, tmp_path)

    other = adapted(path, config, seed=2)  # same layers, other values: loading must overwrite every one
    assert (logits(other, x) - expected).abs().max() > 1e-3
    load_adapter(other, tmp_path)
    assert (expected - base_out).abs().max() > 1e-3
    torch.testing.assert_close(logits(other, x), expected, rtol=0, atol=0)


def test_load_into_plain_model_injects_from_the_file(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    x = tokens()
    model = adapted(tiny_llama, cfg(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 8}))
    expected = logits(model, x)
    save_adapter(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = logits(plain, x)
    load_adapter(plain, tmp_path)
    assert plain.model.layers[1].self_attn.q_proj.r == 8
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(logits(plain, x), expected, rtol=0, atol=0)


# ---- strict loading: every bad input leaves the model exactly as it was ------------------------------------------


def _rewrite(folder, drop=(), add=None, metadata_drop=("hf_lowrank.checksum", "hf_lowrank.config_checksum"),
             metadata_add=None):
    """Rewrite the weights file with keys dropped / added, as another tool (no checksum of ours) would."""
    from safetensors.torch import save_file

    tensors, meta = tensors_of(folder)
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"),
              metadata={**{k: v for k, v in meta.items() if k not in metadata_drop}, **(metadata_add or {})})


def _legacy_crc32(tensors) -> str:
    """The header checksum of adapters saved by earlier development versions (CRC-32, same byte order)."""
    import zlib

    crc = 0
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        crc = zlib.crc32(f"{key}|{t.dtype}|{list(t.shape)}|".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class Evil:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _break(case: str, folder: Path, tmp_path: Path, other_base: str) -> Path:
    weights = folder / "adapter_model.safetensors"
    q0 = "base_model.model.model.layers.0.self_attn.q_proj."
    up0 = "base_model.model.model.layers.0.mlp.up_proj."
    if case == "missing_key":
        _rewrite(folder, drop=[q0 + "lora_A.weight", q0 + "lora_B.weight"])
    elif case == "unexpected_key":
        _rewrite(folder, add={up0 + "lora_A.weight": torch.ones(4, 128), up0 + "lora_B.weight": torch.ones(256, 4)})
    elif case == "lone_lora_b":  # an adapter holding a B without its A
        _rewrite(folder, drop=[q0 + "lora_A.weight"])
    elif case == "shape_mismatch":
        save_adapter(adapted(other_base, cfg(target_modules=["q_proj", "v_proj"])), folder)
    elif case == "corrupted_header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    elif case == "corrupted_data":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x40
        weights.write_bytes(bytes(data))
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "empty_tensor":
        _rewrite(folder, drop=[q0 + "lora_A.weight"], add={q0 + "lora_A.weight": torch.empty(0)})
    elif case == "missing_config":
        (folder / "adapter_config.json").unlink()
    elif case == "bad_config":
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    elif case == "legacy_checksum_corrupted":  # an adapter from before the xxh3 checksum, with a flipped bit
        _rewrite(folder, metadata_add={"hf_lowrank.crc32": _legacy_crc32(tensors_of(folder)[0])})
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x40
        weights.write_bytes(bytes(data))
    elif case == "not_lora_and_truncated":  # the config is the better explanation than the truncated weights
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "target_and_saved":  # q_proj both adapted and saved in full
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["q_proj"]}))
        _rewrite(folder, add={f"base_model.model.model.layers.{i}.self_attn.q_proj.weight": torch.ones(128, 128)
                              for i in range(2)})
    elif case == "two_names_for_a_tensor":  # PEFT's `default` adapter name is optional: a second copy of v's A
        _rewrite(folder, add={"base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight":
                              torch.ones(1, 128)})
    elif case in ("nested_quantization", "nested_training"):  # a header entry nested past Python's recursion limit
        _rewrite(folder, metadata_add={f"hf_lowrank.{case.split('_')[1]}": "[" * 100_000 + "]" * 100_000})
    elif case == "training_not_json":
        _rewrite(folder, metadata_add={"hf_lowrank.training": "{not json"})
    elif case == "endless_config":  # a link to a file whose size stat reports as 0 and whose content never ends
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_config.json").symlink_to("/proc/self/pagemap")
    elif case == "config_linked_out":  # a link to a file outside the folder, a valid adapter config at that
        (tmp_path / "elsewhere.json").write_text((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")

    elif case == "no_folder":
        return tmp_path / "does-not-exist"
    elif case == "pickle":
        weights.unlink()
        with open(folder / "adapter_model.bin", "wb") as f:
            pickle.dump(Evil(str(tmp_path / "unpickled")), f)
    return folder


BAD = {
    "missing_key": r"2 missing key\(s\), e.g. \['model.layers.0.self_attn.q_proj.lora_A.weight', "
                   r"'model.layers.0.self_attn.q_proj.lora_B.weight'\]",
    "unexpected_key": r"2 unexpected key\(s\), e.g. \['model.layers.0.mlp.up_proj.lora_A.weight', "
                      r"'model.layers.0.mlp.up_proj.lora_B.weight'\]",
    "lone_lora_b": "layers.0.self_attn.q_proj has lora_B but no lora_A tensor",
    "shape_mismatch": "shape mismatch",
    "corrupted_header": "corrupted or truncated",
    "corrupted_data": "do not match the checksum",
    "truncated": "corrupted or truncated",
    "empty_tensor": "is empty",
    "missing_config": "adapter_config.json is missing",
    "bad_config": "not valid JSON",
    "legacy_checksum_corrupted": "do not match the checksum",
    "not_lora_and_truncated": "reads LORA only",
    "target_and_saved": "both a LoRA target and in modules_to_save|unexpected key",
    "no_folder": "does not exist",
    "pickle": "never unpickles",
    "two_names_for_a_tensor": r"holds both 'base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\."
                              r"(default\.)?weight' and '[^']+', two names for the parameter "
                              r"'model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight'",
    "nested_quantization": "hf_lowrank.quantization is nested too deeply",
    "nested_training": "hf_lowrank.training is nested too deeply",
    "training_not_json": r"hf_lowrank.training is not valid JSON \(Expecting property name",
    "endless_config": r"adapter_config.json is a symlink to '/proc/self/pagemap', outside .*: an adapter is read from "
                      "its folder",
    "config_linked_out": r"adapter_config.json is a symlink to '.*elsewhere.json', outside",
}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> str:
    """A Llama with another width: an adapter for it does not fit tiny_llama."""
    return save_tiny(tmp_path_factory.mktemp("llama_wide"), "llama", hidden_size=192, num_attention_heads=3,
                     num_key_value_heads=3)


@pytest.mark.parametrize("target", ["with_adapters", "plain"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_model_unchanged(tiny_llama, other_base, tmp_path, case, target):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "adapter"
    save_adapter(adapted(tiny_llama, cfg(target_modules=["q_proj", "v_proj"]), seed=1), folder)
    src = _break(case, folder, tmp_path, other_base)

    if target == "plain":
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    else:
        model = adapted(tiny_llama, cfg(target_modules=["q_proj", "v_proj"]), seed=2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(AdapterError, match=BAD[case]) as err:
        load_adapter(model, src)
    if case == "shape_mismatch":  # names the base the adapter was trained on
        assert other_base in str(err.value) and "adapter [4, 192] vs this model [4, 128]" in str(err.value)
    if case not in ("no_folder",):
        assert str(folder) in str(err.value)
    assert not (tmp_path / "unpickled").exists()
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(after[k], v), k


def test_peft_written_without_checksum_is_accepted(tiny_llama, tmp_path):
    """No checksum in the header (PEFT's files) is fine: the header and key checks still apply."""
    save_adapter(adapted(tiny_llama, cfg()), tmp_path)
    _rewrite(tmp_path)
    assert "hf_lowrank.checksum" not in read_adapter(tmp_path).metadata


def test_checksum_is_xxh3_and_legacy_crc32_files_still_load(tiny_llama, tmp_path):
    model = adapted(tiny_llama, cfg())
    save_adapter(model, tmp_path)
    tensors, meta = tensors_of(tmp_path)
    import xxhash

    h = xxhash.xxh3_64()
    for key in sorted(tensors):
        h.update(f"{key}|{tensors[key].dtype}|{list(tensors[key].shape)}|".encode())
        h.update(tensors[key].reshape(-1).view(torch.uint8).numpy())
    assert meta["hf_lowrank.checksum"] == "xxh3_64:" + h.hexdigest()
    _rewrite(tmp_path, metadata_add={"hf_lowrank.crc32": _legacy_crc32(tensors)})  # as saved before xxh3
    files = read_adapter(tmp_path)
    assert "hf_lowrank.checksum" not in files.metadata and "hf_lowrank.crc32" in files.metadata
    fresh = adapted(tiny_llama, cfg(), seed=5)
    load_adapter(fresh, files)
    x = tokens()
    out = logits(fresh, x)
    assert torch.equal(out, logits(model, x)) and not torch.equal(out, logits(adapted(tiny_llama, cfg(), seed=5), x))


# ---- saving --------------------------------------------------------------------------------------------------------


def test_refuses_empty_tensors_and_keeps_previous(tiny_llama, tmp_path):
    model = adapted(tiny_llama, cfg(target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    gathered_nothing = {f"{n}.lora_{ab}.weight": torch.empty(0) for n, _ in hf_lowrank.lora_layers(model)
                        for ab in "AB"}  # what an ungathered ZeRO-3 state dict holds
    with pytest.raises(AdapterError, match="refusing to save .* the tensor is empty"):
        save_adapter(model, tmp_path, state_dict=gathered_nothing)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import hf_lowrank
    from hf_lowrank.state import save_adapter

    folder, mode = sys.argv[1], sys.argv[2]
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    hf_lowrank.inject(model, hf_lowrank.LowRankConfig(r=1024 if mode == "random" else 8, target_modules=["0"],
                                                      quantization=None, modules_to_save=[]))
    def fill(value):
        with torch.no_grad():
            model[0].lora_A.weight.fill_(value)
            model[0].lora_B.weight.fill_(value)
    fill(1.0)
    save_adapter(model, folder)
    print("ready", flush=True)
    if mode == "fsync":  # die the moment the new weights are written, before any rename
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        fill(2.0)
        save_adapter(model, folder)
    else:  # save new values until killed from outside, at whatever point the write has reached
        value = 1.0
        while True:
            value += 1.0
            fill(value)
            save_adapter(model, folder)
""")


def _reload_values(folder) -> set[float]:
    files = read_adapter(folder)  # checks header, checksum and empty tensors
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    load_adapter(model, files)
    layer = model[0]
    return set(layer.lora_A.weight.unique().tolist()) | set(layer.lora_B.weight.unique().tolist())


@pytest.mark.parametrize("mode", ["fsync", "random"])
def test_killed_save_leaves_previous_adapter_loadable(tmp_path, mode):
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE.format(tests=str(Path(__file__).parent)))
    folder = tmp_path / "adapter"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        if mode == "random":  # kill while a save is writing its temporary files
            while not list(folder.glob(".hf_lowrank-save-*/*")):
                time.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    values = _reload_values(folder)
    assert len(values) == 1  # one whole save, never a mix
    if mode == "fsync":
        assert values == {1.0}
        assert [p.name for p in folder.glob(".hf_lowrank-save-*/*")] == ["adapter_model.safetensors"]  # complete,
        # yet not renamed
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    hf_lowrank.inject(model, hf_lowrank.LowRankConfig(r=8, target_modules=["0"], quantization=None,
                                                      modules_to_save=[]))
    save_adapter(model, folder)  # the next save cleans up what the killed one left
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_adapter_modules_never_import_peft():
    """peft is a test dependency only: reading, writing, merging and inspecting adapters work without it."""
    code = ("import sys, hf_lowrank, hf_lowrank.state, hf_lowrank.export, hf_lowrank.card; "
            "assert 'peft' not in sys.modules, 'peft was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_base_the_adapter_names_is_never_unpickled(tiny_llama, tmp_path):
    """`load` reads the base an adapter's config names (a stranger's choice, for a Hub adapter) from safetensors only:
    a base holding only pytorch_model.bin (transformers would torch.load it) is refused, naming it and the fix; the
    same base passed explicitly as base= loads (the user's choice), and the adapter reproduces the trained model."""
    import shutil

    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    shutil.copy(Path(tiny_llama) / "config.json", pickled / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict(), pickled / "pytorch_model.bin")
    model = adapted(str(pickled), cfg())
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(pickled)
    with pytest.raises(AdapterError, match=rf"the base model '{pickled}' recorded in .*adapter_config.json has no "
                                           r"safetensors weights .*does not unpickle a base an adapter names: pass "
                                           r"base="):
        hf_lowrank.load(AutoModelForCausalLM, tmp_path / "adapter")
    loaded = hf_lowrank.load(AutoModelForCausalLM, tmp_path / "adapter", base=str(pickled))
    x = tokens(2, 12)
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model.eval(), x), rtol=0, atol=1e-5)


def test_links_into_a_hub_cache_repos_blobs_are_read_others_refused(tiny_llama, tmp_path):
    """huggingface_hub stores a download as links from snapshots/<revision>/… into the repo's blobs, also for an
    adapter in a subfolder (a pushed `last-checkpoint`): those are read; a link from such a folder to anywhere
    else is refused."""
    save_adapter(adapted(tiny_llama, cfg()), tmp_path / "saved")
    repo = tmp_path / "hub" / "models--alice--tiny"
    (repo / "blobs").mkdir(parents=True)
    for where in ("", "last-checkpoint"):
        folder = repo / "snapshots" / "0123abcd" / where
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            blob = repo / "blobs" / f"{where or 'root'}-{name}"
            blob.write_bytes((tmp_path / "saved" / name).read_bytes())
            (folder / name).symlink_to(os.path.relpath(blob, folder))
        files = read_adapter(folder)
        assert files.tensors.keys() == read_adapter(tmp_path / "saved").tensors.keys()
    outside = repo / "snapshots" / "0123abcd" / "adapter_model.safetensors"
    outside.unlink()
    outside.symlink_to(tmp_path / "saved" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors is a symlink to .*, outside"):
        read_adapter(outside.parent)
    # the same layout without the cache's repo folder (models--org--name) above `snapshots`: not the cache
    plain = tmp_path / "data"
    shutil.copytree(repo, plain, symlinks=True)
    with pytest.raises(AdapterError, match=r"adapter_config.json is a symlink to '\.\./\.\./blobs/root-.*, outside"):
        read_adapter(plain / "snapshots" / "0123abcd")


def test_a_folder_named_like_the_base_but_not_a_model_keeps_the_hub_id(tiny_llama, tmp_path, monkeypatch):
    """A base loaded from the Hub as "org/name" is recorded as that id even where the working directory holds a
    folder of that name that is not a model (an output folder named after the base)."""
    from hf_lowrank.format import peft_config_dict

    model = adapted(tiny_llama, cfg())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    model.config._name_or_path = "org/name"
    assert peft_config_dict(model)["base_model_name_or_path"] == "org/name"
    (tmp_path / "org" / "name" / "config.json").write_text("{}")  # now a model folder here: recorded absolute
    assert peft_config_dict(model)["base_model_name_or_path"] == str(tmp_path / "org" / "name")
