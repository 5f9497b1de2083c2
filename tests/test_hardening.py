"""Untrusted adapters, killed saves and published files (issue: hardening). Each numbered defect of the adversarial
trial has a test here that reproduces it; every refusal names the bad thing and leaves everything as it was."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import logits, randomize_b, save_tiny, tokens

import hf_lowrank
from hf_lowrank import AdapterError
from hf_lowrank.export import inspect_main, merge_main
from hf_lowrank.state import read_adapter, save_adapter

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def cfg(**kw) -> hf_lowrank.LowRankConfig:
    return hf_lowrank.LowRankConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "quantization": None, **kw})


def adapted(base: str, seed: int = 1, **kw):
    from transformers import AutoModelForCausalLM

    return randomize_b(hf_lowrank.from_pretrained(AutoModelForCausalLM, base, cfg(**kw)), seed)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite(folder: Path, tensors=None, metadata=None, config=None, drop_checksums: bool = True) -> None:
    """Rewrite an adapter as another tool would (no checksums of ours): new tensors / header / config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(folder / WEIGHTS, "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata() or {})
    if drop_checksums:
        meta = {k: v for k, v in meta.items() if k not in ("hf_lowrank.checksum", "hf_lowrank.config_checksum")}
    new = tensors(old) if callable(tensors) else old
    save_file(new, str(folder / WEIGHTS), metadata={**meta, **(metadata or {})})
    if config is not None:
        current = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps(config(current) if callable(config) else {**current, **config}))


@pytest.fixture
def llama_adapter(tiny_llama, tmp_path):
    """(model, folder): a plain (16-bit) adapter of the tiny Llama, saved."""
    model = adapted(tiny_llama)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _plain_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---- 1. merge writes only inside --output ---------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["/tmp/hf-lowrank-victim.safetensors", "../victim.safetensors", "sub/x.safetensors",
                                   ".hidden.safetensors"])
def test_merge_refuses_shard_names_outside_output(tiny_llama, tmp_path, capsys, shard):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(base, max_shard_size="200KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    save_adapter(adapted(tiny_llama), tmp_path / "adapter")
    out = tmp_path / "out" / "merged"
    assert merge_main([str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--no-drift"]) == 1
    err = capsys.readouterr().err
    assert f"shard name {shard!r} is not a plain .safetensors file name" in err
    assert victim.read_bytes() == b"precious" and not out.exists()
    assert not Path("/tmp/hf-lowrank-victim.safetensors").exists()


def test_merge_copies_links_inside_the_base_and_skips_links_out_naming_them(tiny_llama, tmp_path, capsys):
    """A local base (below a folder that happens to be called `snapshots`, which is not the Hub cache): a link to a
    file of the base itself is copied as its content; a link out of it (here into a `blobs` beside `snapshots`) is
    not followed, and the merge says which file it skipped."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "snapshots" / "2024" / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(base)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (base / "tokenizer.json").symlink_to("../../../blobs/id_rsa")
    (base / "alias.json").symlink_to("generation_config.json")
    save_adapter(adapted(tiny_llama), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_main([str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--no-drift"]) == 0
    printed = capsys.readouterr().out
    assert "skipped tokenizer.json: a symlink out of" in printed and "../../../blobs/id_rsa" in printed, printed
    assert not (out / "tokenizer.json").exists()
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in out.iterdir())
    assert not (out / "alias.json").is_symlink()
    assert (out / "alias.json").read_bytes() == (base / "generation_config.json").read_bytes()


@pytest.mark.parametrize(("index", "message"), [
    ({"metadata": ["total_size", 1]}, """'metadata' is ["total_size", 1], not an object"""),
    ({"metadata": "x"}, """'metadata' is "x", not an object"""),
    ({"metadata": None}, "'metadata' is null, not an object"),
    ({"metadata": {}, "weight_map": ["model-00001.safetensors"]}, "is not a valid safetensors index (AttributeError"),
    ([], "is not a valid safetensors index (TypeError"),
])
def test_merge_refuses_a_malformed_index(tiny_llama, tmp_path, capsys, index, message):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(base, max_shard_size="200KB")
    good = json.loads((base / "model.safetensors.index.json").read_text())
    bad = index if isinstance(index, list) else {**good, **index}
    (base / "model.safetensors.index.json").write_text(json.dumps(bad))
    save_adapter(adapted(tiny_llama), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_main([str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--no-drift"]) == 1
    err = capsys.readouterr().err
    assert f"{base / 'model.safetensors.index.json'}" in err and message in err, err
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir()), "nothing written"


# ---- 2. push uploads only regular files inside the folder -------------------------------------------------------


@pytest.mark.parametrize("name", ["README.md", WEIGHTS, CONFIG])
def test_push_refuses_symlinks_before_reading_or_sending(llama_adapter, tmp_path, name):
    _, folder = llama_adapter
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    real = folder / name
    moved = tmp_path / ("moved-" + name)
    real.rename(moved)
    (folder / name).symlink_to(secret if name == "README.md" else moved)
    with pytest.raises(hf_lowrank.HubError, match=f"refusing to push {folder / name}: it is a symlink"):
        # an endpoint nothing listens on: the refusal comes before any request
        hf_lowrank.push_adapter(folder, "alice/x", token="hf_x", endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("hard_links", [True, False])
def test_push_refuses_a_file_swapped_for_a_symlink_after_the_check(llama_adapter, tmp_path, monkeypatch, hard_links):
    """The swap lands between the check of the folder and its staging (here: right after the adapter is read):
    the staged entry is the link itself, never its target, and the push stops before any request."""
    import hf_lowrank.hub as hub

    _, folder = llama_adapter
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    read = hub.read_adapter

    def read_then_swap(path):
        files = read(path)
        (folder / "README.md").unlink()
        (folder / "README.md").symlink_to(secret)
        return files

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "read_adapter", read_then_swap)
    if not hard_links:  # staging on another file system: the copy path
        def no_link(*a, **k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "link", no_link)
    staged = []
    monkeypatch.setattr(hub.tempfile, "TemporaryDirectory",
                        lambda **k: staged.append(tmp_path / "push-tmp") or _Kept(tmp_path / "push-tmp"))
    message = f"refusing to push {folder / 'README.md'}: it is a symlink to '{secret}'"
    with pytest.raises(hf_lowrank.HubError, match=re.escape(message)):
        hf_lowrank.push_adapter(folder, "alice/x", token="hf_x", endpoint="http://127.0.0.1:9")
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in staged[0].rglob("*") if p.is_file()), \
        "the secret was never staged"


@pytest.mark.parametrize("hard_links", [True, False])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "missing"])
def test_staging_takes_only_a_regular_file(tmp_path, monkeypatch, hard_links, kind):
    """What a push stages from the folder (`hub._link_or_copy`): a regular file as it is; anything else refused by
    name, with nothing left in the staging folder."""
    from hf_lowrank.hub import _link_or_copy

    (tmp_path / "secret").write_text("key")
    src, dst = tmp_path / "README.md", tmp_path / "staged"
    {"symlink": lambda: src.symlink_to(tmp_path / "secret"), "fifo": lambda: os.mkfifo(src),
     "folder": lambda: src.mkdir(), "missing": lambda: None}[kind]()
    if not hard_links:
        def no_link(*a, **k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "link", no_link)
    what = {"symlink": "a symlink to", "missing": "gone (removed while the push ran)"}.get(kind, "not a regular file")
    with pytest.raises(hf_lowrank.HubError, match=re.escape(f"refusing to push {src}: it is {what}")):
        _link_or_copy(src, dst)
    assert not os.path.lexists(dst)
    (tmp_path / "plain").write_text("card")
    _link_or_copy(tmp_path / "plain", tmp_path / "plain-staged")
    assert (tmp_path / "plain-staged").read_text() == "card" and not (tmp_path / "plain-staged").is_symlink()


class _Kept:
    """A temporary folder left in place after its `with` block, so the test can look at what was staged."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        self.path.mkdir()
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


# ---- 3. saves: atomic across files, serialized per folder ---------------------------------------------------------

SAVER = textwrap.dedent("""
    import os, signal, sys, torch
    import hf_lowrank
    from hf_lowrank.state import save_adapter

    folder, mode = sys.argv[1], sys.argv[2]
    model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    def adapter(version):  # two distinguishable saves: values and lora_alpha differ
        m = torch.nn.Sequential(torch.nn.Linear(512, 512))
        hf_lowrank.inject(m, hf_lowrank.LowRankConfig(r=64, lora_alpha=8 * version, target_modules=["0"],
                                                      quantization=None, modules_to_save=[]))
        with torch.no_grad():
            m[0].lora_A.weight.fill_(version)
            m[0].lora_B.weight.fill_(version)
        return m
    one, two = adapter(1), adapter(2)
    if mode == "between-renames":
        save_adapter(one, folder)
        replace = os.replace
        def replace_then_die(src, dst):
            replace(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)  # right after the first rename of the second save
        os.replace = replace_then_die
        save_adapter(two, folder)
    elif mode == "loop":
        save_adapter(one, folder)
        print("ready", flush=True)
        i = 0
        while True:
            i += 1
            save_adapter(two if i % 2 else one, folder)
    else:  # "concurrent": N saves, alternating, reporting failures
        failures = 0
        for i in range(int(mode)):
            try:
                save_adapter(two if i % 2 else one, folder)
            except Exception as e:
                failures += 1
                print("FAILED", type(e).__name__, e, flush=True)
        print("failures", failures, flush=True)
""")


def _which_save(folder: Path) -> str:
    """"one" or "two" when the folder loads as exactly one of the two saves; raises AdapterError otherwise."""
    files = read_adapter(folder)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    hf_lowrank.load_adapter(model, files)
    values = set(model[0].lora_A.weight.unique().tolist()) | set(model[0].lora_B.weight.unique().tolist())
    version = {frozenset({1.0}): 1, frozenset({2.0}): 2}[frozenset(values)]
    assert model[0].scaling == 8 * version / 64, "weights of one save with the lora_alpha of the other"
    return {1: "one", 2: "two"}[version]


def _saver(tmp_path: Path) -> Path:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    return script


def test_kill_between_renames_is_refused_not_mixed(tmp_path):
    folder = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, str(_saver(tmp_path)), str(folder), "between-renames"], timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(AdapterError, match=r"does not belong to .* \(a save into this folder was interrupted\)"):
        _which_save(folder)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512))  # the next save repairs the folder
    hf_lowrank.inject(model, hf_lowrank.LowRankConfig(r=64, lora_alpha=8, target_modules=["0"], quantization=None,
                                                      modules_to_save=[]))
    with torch.no_grad():
        model[0].lora_A.weight.fill_(1.0)
        model[0].lora_B.weight.fill_(1.0)
    save_adapter(model, folder)
    assert _which_save(folder) == "one"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG, WEIGHTS]


def test_twenty_random_kills_leave_one_whole_save_or_a_clear_refusal(tmp_path):
    """20 kills at random points of a loop of saves (writing, fsync, between renames): after each, the folder
    loads as exactly the old or the new adapter (values and scaling), or is refused with an AdapterError."""
    rng = random.Random(0)
    script = _saver(tmp_path)
    outcomes: dict[str, int] = {}
    for i in range(20):
        folder = tmp_path / f"adapter-{i}"
        proc = subprocess.Popen([sys.executable, str(script), str(folder), "loop"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, 0.25))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            outcome = _which_save(folder)
        except AdapterError as e:
            assert "does not belong" in str(e) or "corrupted" in str(e), e
            outcome = "refused"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) == 20 and outcomes.get("one", 0) + outcomes.get("two", 0) >= 1, outcomes


def test_two_processes_saving_into_one_folder_serialize(tmp_path):
    folder = tmp_path / "adapter"
    script = _saver(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), "40"], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("failures 0" in out for out in outs), outs
    assert _which_save(folder) in ("one", "two")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG, WEIGHTS]


# ---- 4. merge checks as strictly as load_adapter, and writes atomically ---------------------------------------------


def _merge_case(case: str, tiny_llama: str, folder: Path, tmp_path: Path) -> tuple[str, str]:
    """Break the adapter (or pick a base) for `case`; returns (base path, expected message)."""
    q0 = "base_model.model.model.layers.0.self_attn.q_proj."
    if case == "undeclared_head":
        rewrite(folder, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(256, 128)})
        return tiny_llama, r"1 unexpected key\(s\), e.g. \['lm_head.weight'\]"
    if case == "only_lora_b":
        rewrite(folder, lambda t: {k: v for k, v in t.items() if ".lora_A." not in k})
        return tiny_llama, "has lora_B but no lora_A tensor"
    if case == "fewer_layers":
        return save_tiny(tmp_path / "one-layer", "llama", num_hidden_layers=1), r"14 unexpected key\(s\)"
    if case == "nan":
        rewrite(folder, lambda t: {**t, q0 + "lora_B.weight": torch.full_like(t[q0 + "lora_B.weight"], float("nan"))})
        return tiny_llama, "lora_B.weight holds NaN or infinite values"
    if case == "wrong_hidden_size":
        return save_tiny(tmp_path / "wide", "llama", hidden_size=192, num_attention_heads=3, num_key_value_heads=3), \
            "shape mismatch"
    if case == "missing_key":
        rewrite(folder, lambda t: {k: v for k, v in t.items() if not k.startswith(q0)})
        return tiny_llama, r"2 missing key\(s\)"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["undeclared_head", "only_lora_b", "fewer_layers", "nan", "wrong_hidden_size",
                                  "missing_key"])
def test_merge_validates_like_load_adapter_and_writes_nothing(tiny_llama, tmp_path, capsys, case):
    folder = tmp_path / "adapter"
    save_adapter(adapted(tiny_llama), folder)
    base, message = _merge_case(case, tiny_llama, folder, tmp_path)
    base_before = snapshot(Path(base))
    with pytest.raises(AdapterError, match=message):  # the same verdict as loading it
        hf_lowrank.load_adapter(_plain_model(base), folder)
    out = tmp_path / "merged"
    assert merge_main([str(folder), "--base", base, "--output", str(out), "--no-drift"]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".merged.*")), "nothing is left behind"
    assert snapshot(Path(base)) == base_before


def test_merge_failure_mid_way_leaves_no_partial_output(tiny_llama, tmp_path, capsys):
    """A shard that cannot be read half-way through: the output folder never appears, an old one stays intact."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(base, max_shard_size="200KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:-64])  # truncated: fails when reached
    save_adapter(adapted(tiny_llama), tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old merge")
    assert merge_main([str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--no-drift",
                       "--overwrite"]) == 1
    assert snapshot(out) == {"keep.txt": b"old merge"}
    assert not list(tmp_path.glob(".merged.*"))
    assert merge_main([str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--no-drift"]) == 2
    assert "already exists" in capsys.readouterr().err  # a usage error: exit 2


# ---- 5. patterns from a config match in bounded time ------------------------------------------------------------


def test_catastrophic_regex_target_finishes_fast(tiny_llama, llama_adapter):
    _, folder = llama_adapter
    rewrite(folder, config={"target_modules": "(.*.*)*X"})
    model = _plain_model(tiny_llama)
    before = _state(model)
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"matched no layer"):
        hf_lowrank.load_adapter(model, folder)
    assert time.perf_counter() - start < 10, "python's re would take minutes on this pattern"
    assert_unchanged(model, before)
    rewrite(folder, config={"target_modules": ".*(q_proj|v_proj)", "rank_pattern": {"(.*.*)*Y": 2}})
    read_adapter(folder)  # valid, fast: the rank pattern matches nothing


@pytest.mark.parametrize(("field", "pattern"), [("target_modules", r"(?=q).*"), ("rank_pattern", r"(a)\1"),
                                                ("alpha_pattern", "x" * 3000)])
def test_patterns_that_cannot_run_in_bounded_time_are_refused(llama_adapter, field, pattern):
    _, folder = llama_adapter
    value = {pattern: 4} if field != "target_modules" else pattern
    rewrite(folder, config={field: value})
    with pytest.raises(AdapterError, match=f"{field}.*(bounded time|at most 2,000 are accepted)"):
        read_adapter(folder)


# ---- 6. non-finite values and wrong dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize(("case", "message"), [
    ("lora_b_nan", "lora_B.weight holds NaN or infinite values"),
    ("lora_b_inf", "lora_B.weight holds NaN or infinite values"),
    ("alpha_nan", "lora_alpha=nan is not valid"),
    ("alpha_inf", "lora_alpha=inf is not valid"),
    ("alpha_huge", "lora_alpha=1e[+]30 is not valid"),
    ("int8", "lora_A.weight has dtype int8"),
    ("bool", "lora_A.weight has dtype bool"),
    ("fp8", "lora_A.weight has dtype float8_e4m3fn"),
])
def test_non_finite_and_wrong_dtype_are_refused_everywhere(tiny_llama, llama_adapter, tmp_path, capsys, case,
                                                           message):
    _, folder = llama_adapter
    q0 = "base_model.model.model.layers.0.self_attn.q_proj."
    if case.startswith("lora_b"):
        value = float("nan") if case == "lora_b_nan" else float("inf")
        rewrite(folder, lambda t: {**t, q0 + "lora_B.weight": torch.full_like(t[q0 + "lora_B.weight"], value)})
    elif case.startswith("alpha"):
        alpha = {"alpha_nan": float("nan"), "alpha_inf": float("inf"), "alpha_huge": 1e30}[case]
        rewrite(folder, config={"lora_alpha": alpha}, drop_checksums=True)
    else:
        dtype = {"int8": torch.int8, "bool": torch.bool, "fp8": torch.float8_e4m3fn}[case]
        rewrite(folder, lambda t: {**t, q0 + "lora_A.weight": t[q0 + "lora_A.weight"].to(dtype)})
    model = _plain_model(tiny_llama)
    before = _state(model)
    with pytest.raises(AdapterError, match=message):
        hf_lowrank.load_adapter(model, folder)
    assert_unchanged(model, before)
    assert merge_main([str(folder), "--base", tiny_llama, "--output", str(tmp_path / "m"), "--no-drift"]) == 1
    assert inspect_main([str(folder)]) == 1
    with pytest.raises(AdapterError, match=message):
        hf_lowrank.push_adapter(folder, "alice/x", token="hf_x", endpoint="http://127.0.0.1:9")
    assert not (tmp_path / "m").exists()


def test_finite_values_whose_sum_overflows_still_load(tiny_llama, llama_adapter):
    """The finiteness check sums first: huge but finite values (their fp32 sum is inf) are checked element by
    element and accepted; a NaN among them is still found."""
    _, folder = llama_adapter
    q0 = "base_model.model.model.layers.0.self_attn.q_proj."
    huge = torch.full((4, 128), 3e38)
    rewrite(folder, lambda t: {**t, q0 + "lora_A.weight": huge.clone()})
    model = _plain_model(tiny_llama)
    hf_lowrank.load_adapter(model, folder)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, huge)
    huge[3, 5] = float("nan")
    rewrite(folder, lambda t: {**t, q0 + "lora_A.weight": huge})
    with pytest.raises(AdapterError, match="lora_A.weight holds NaN or infinite values"):
        hf_lowrank.load_adapter(_plain_model(tiny_llama), folder)


# ---- 7. tensors are checked against the config in every path ----------------------------------------------------


def test_config_rank_that_disagrees_with_the_tensors_is_refused(tiny_llama, llama_adapter):
    model, folder = llama_adapter  # an adapted model with r=4 layers
    rewrite(folder, config={"r": 8})
    before = _state(model)
    with pytest.raises(AdapterError, match="rank 4 in its tensors but 8 in adapter_config.json"):
        hf_lowrank.load_adapter(model, folder)
    assert_unchanged(model, before)
    assert model.lowrank_config.r == 4


# ---- 8. resume skips a checkpoint whose save was killed -----------------------------------------------------------


def test_resume_skips_a_checkpoint_killed_mid_save(tiny_llama, tmp_path, caplog):
    import logging

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(1, 256, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    def trainer(steps):
        model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, cfg())
        args = TrainingArguments(str(tmp_path / "out"), max_steps=steps, save_steps=2, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=4, learning_rate=1e-3)
        return Trainer(model=model, args=args, train_dataset=Data(), callbacks=[hf_lowrank.LowRankCallback()])

    trainer(2).train()
    killed = tmp_path / "out" / "checkpoint-4"
    (killed / ".hf_lowrank-save-abc123").mkdir(parents=True)  # what a kill during its adapter save leaves
    (killed / ".hf_lowrank-save-abc123" / WEIGHTS).write_bytes(b"half")
    resumed = trainer(4)
    with caplog.at_level(logging.WARNING, logger="hf_lowrank"):
        resumed.train(resume_from_checkpoint=True)
    assert any(f"skipping {killed}" in r.getMessage() for r in caplog.records)
    assert resumed.state.global_step == 4
    assert (tmp_path / "out" / "checkpoint-4" / WEIGHTS).is_file()


# ---- 9. every bad file raises AdapterError, never another exception ----------------------------------------------


@pytest.mark.parametrize(("case", "message"), [
    ("quantization_not_object", "hf_lowrank.quantization is list, not an object"),
    ("quantization_bad_json", "header entry"),
    ("zero_dim", "is a 0-dim scalar"),
    ("deep_config", "nested too deeply"),
    ("huge_config", "a LoRA config is a few hundred"),
])
def test_bad_files_raise_adapter_error_in_every_path(tiny_llama, llama_adapter, tmp_path, capsys, case, message):
    from transformers import AutoModelForCausalLM

    _, folder = llama_adapter
    if case == "quantization_not_object":
        rewrite(folder, metadata={"hf_lowrank.quantization": "[1, 2]"})
    elif case == "quantization_bad_json":
        rewrite(folder, metadata={"hf_lowrank.quantization": "{not json"})
    elif case == "zero_dim":
        rewrite(folder, lambda t: {**t, "base_model.model.model.norm.weight": torch.tensor(1.0)})
    elif case == "deep_config":
        (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    elif case == "huge_config":
        (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "pad": "x" * (2 << 20)}))
    model = _plain_model(tiny_llama)
    before = _state(model)
    for call in (lambda: hf_lowrank.load_adapter(model, folder),
                 lambda: hf_lowrank.load(AutoModelForCausalLM, str(folder), base=tiny_llama)):
        with pytest.raises(AdapterError, match=message):
            call()
    assert_unchanged(model, before)
    assert inspect_main([str(folder)]) == 1
    assert merge_main([str(folder), "--base", tiny_llama, "--output", str(tmp_path / "m"), "--no-drift"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.split(" ")[0] in err


def test_inspect_of_only_lora_b_and_merge_output_naming_a_file(llama_adapter, tmp_path, capsys):
    _, folder = llama_adapter
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    assert merge_main([str(folder), "--output", str(target), "--no-drift"]) == 2  # a usage error
    assert "is a file" in capsys.readouterr().err and target.read_text() == "not a folder"
    rewrite(folder, lambda t: {k: v for k, v in t.items() if ".lora_A." not in k})
    assert inspect_main([str(folder)]) == 1
    assert "has lora_B but no lora_A" in capsys.readouterr().err


# ---- fuzz: mutated copies either load with identical outputs or raise AdapterError ----------------------------------

FUZZ_CASES, FUZZ_SECONDS = 120, 60


def _mutate(rng: random.Random, folder: Path) -> str:
    weights, config = folder / WEIGHTS, folder / CONFIG
    kind = rng.choice(["flip", "truncate", "header", "config_value", "config_key", "config_bytes"])
    if kind == "flip":
        data = bytearray(weights.read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(data))
    elif kind == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "header":  # edit the JSON header in place (same length, so offsets stay)
        data = bytearray(weights.read_bytes())
        n = int.from_bytes(data[:8], "little")
        i = rng.randrange(8, 8 + n)
        data[i] = ord(rng.choice('0123456789",:{}[]abcxyz '))
        weights.write_bytes(bytes(data))
    elif kind.startswith("config"):
        c = json.loads(config.read_text())
        if kind == "config_value":
            key = rng.choice(sorted(c))
            c[key] = rng.choice([None, 0, -1, 1e30, float("nan"), "x", [], {}, ["q_proj"], True, 3, 0.5, "(.*)*"])
            config.write_text(json.dumps(c))
        elif kind == "config_key":
            c.pop(rng.choice(sorted(c)))
            config.write_text(json.dumps(c))
        else:
            text = bytearray(config.read_bytes())
            text[rng.randrange(len(text))] = rng.randrange(256)
            config.write_bytes(bytes(text))
    return kind


def test_fuzzed_adapters_load_identically_or_are_refused(tiny_llama, llama_adapter, tmp_path):
    import shutil

    model, folder = llama_adapter
    x = tokens()
    expected = logits(model, x)
    target = adapted(tiny_llama, seed=7)  # already adapted, other values: a load must change it or nothing
    rng = random.Random(1234)
    start = time.perf_counter()
    kinds: dict[str, list[int]] = {}
    for i in range(FUZZ_CASES):
        case = tmp_path / f"case-{i}"
        shutil.copytree(folder, case)
        kind = _mutate(rng, case)
        before = _state(target)
        try:
            hf_lowrank.load_adapter(target, case)
        except AdapterError:
            assert_unchanged(target, before)
            kinds.setdefault(kind, [0, 0])[1] += 1
        else:
            torch.testing.assert_close(logits(target, x), expected, rtol=0, atol=0)
            kinds.setdefault(kind, [0, 0])[0] += 1
        shutil.rmtree(case)
        assert time.perf_counter() - start < FUZZ_SECONDS, f"{i} cases in {FUZZ_SECONDS} s"
    refused = sum(r for _, r in kinds.values())
    assert refused >= FUZZ_CASES // 3 and sum(a for a, _ in kinds.values()) >= 1, kinds
