"""The real engines on CPU: vLLM serves our saved adapters, llama.cpp our GGUF export, and `inspect`'s verdicts are
what the engines do.

Run with `python -m pytest -m serving tests/test_serving.py` after `scripts/serving_envs.sh` has made the engines'
own virtual environments (vLLM 0.32 and llama-cpp-python 0.3.36; they need other torch / transformers pins than
ours). Each engine runs in a subprocess with its venv's python (tests/serving/*_driver.py); the reference is
hf_lowrank's own model on the float32 base, in this process.

Adapters: trained 20 steps on the NF4 form of a tiny Llama (Llama-2-style tokenizer, built here), saved as they are:
plain, plain saved in bfloat16, rsLoRA, rank + alpha patterns, rank 16 (above the engine's max_lora_rank=8), and
modules_to_save=["lm_head"]. Everything runs in float32 (bfloat16 near-ties in a random tiny model flip tokens).

Bounds (measured on this project's machine, float32 everywhere):
  vLLM       32 of 32 greedy tokens equal; |Δ logprob| of every top-5 token ≤ 1e-4 (measured ≤ 2e-6)
  llama.cpp  32 of 32 greedy tokens equal; max |Δ logit| ≤ 1e-4 with a float32 KV cache (measured ≤ 1e-6),
             ≤ 5e-3 with llama.cpp's default float16 cache (measured ≤ 5e-4)
  "needs export" is real: the same adapter converted as it is (convert_lora_to_gguf.py) is off by ≥ 0.1 (measured
             0.8-1.2), which no rounding explains
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "serving"))

from serving_models import motif, save_base, train_adapter  # noqa: E402

import hf_lowrank  # noqa: E402
from hf_lowrank.format import AdapterError  # noqa: E402
from hf_lowrank.runtimes import ACCEPTED, NEEDS_EXPORT, REFUSED, export, inspect_main, verdicts  # noqa: E402
from hf_lowrank.state import read_adapter  # noqa: E402

pytestmark = pytest.mark.serving

CACHE = Path(os.environ.get("HF_LOWRANK_SERVING_CACHE", Path.home() / ".cache" / "hf-lowrank-serving"))
VLLM_ENV, LLAMA_ENV, CONVERTERS = CACHE / "vllm-0.32.0", CACHE / "llama-cpp-0.3.36", CACHE / "llama.cpp-0.3.36"
MAX_LORA_RANK = 8  # the vLLM engine's setting
STEPS = 16  # greedy tokens per prompt; two prompts
VLLM_LOGPROB_BOUND, LLAMA_LOGIT_BOUND, LLAMA_F16_CACHE_BOUND, WRONG = 1e-4, 1e-4, 5e-3, 0.1

#: what `inspect` must say (vLLM judged at max_lora_rank=8), and what the engines are checked to do accordingly.
EXPECTED = {
    "plain": {"PEFT": ACCEPTED, "vLLM": ACCEPTED, "llama.cpp": ACCEPTED},
    "bf16": {"PEFT": ACCEPTED, "vLLM": ACCEPTED, "llama.cpp": ACCEPTED},
    "rslora": {"PEFT": ACCEPTED, "vLLM": ACCEPTED, "llama.cpp": NEEDS_EXPORT},
    "pattern": {"PEFT": ACCEPTED, "vLLM": ACCEPTED, "llama.cpp": NEEDS_EXPORT},
    "r16": {"PEFT": ACCEPTED, "vLLM": REFUSED, "llama.cpp": ACCEPTED},
    "lm_head": {"PEFT": ACCEPTED, "vLLM": REFUSED, "llama.cpp": REFUSED},
}
#: what each engine says when it refuses (in its log): the verdict's reason must be the engine's.
VLLM_REFUSALS = {"r16": "LoRA rank 16 is greater than max_lora_rank 8",
                 "lm_head": "Unsupported modules_to_save: ['lm_head']"}
LLAMA_CONVERTER_REFUSALS = {"lm_head": "Not a lora_A or lora_B tensor"}


def _ready(env: Path) -> bool:
    return (env / ".stamp").is_file() and (env / "bin" / "python").is_file()


if not (_ready(VLLM_ENV) and _ready(LLAMA_ENV) and (CONVERTERS / "convert_lora_to_gguf.py").is_file()):
    if os.environ.get("HF_LOWRANK_REQUIRE_SERVING") == "1":  # .ci/run: a missing engine is a failure, not a skip
        raise RuntimeError(f"HF_LOWRANK_REQUIRE_SERVING=1 but the serving venvs are not in {CACHE}")
    pytest.skip(f"the serving engines' venvs are not in {CACHE}: run scripts/serving_envs.sh first "
                "(HF_LOWRANK_SERVING_CACHE moves them)", allow_module_level=True)


def _run(python: Path, *args: str | Path, log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command of an engine's venv, with none of this process's Python path; output kept in `log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as f:
        proc = subprocess.run([str(python), *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, cwd=log.parent)
    proc.log = log.read_text(errors="replace")  # type: ignore[attr-defined]
    return proc


# ---- what is served, and the reference ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def base(work) -> Path:
    return save_base(work / "base")


@pytest.fixture(scope="module")
def adapters(base, work) -> dict[str, Path]:
    """name → adapter folder, each trained on the NF4 base and saved as it is."""
    lora = {"plain": {}, "rslora": {"use_rslora": True}, "r16": {"r": 16, "lora_alpha": 16},
            "pattern": {"rank_pattern": {"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                        "alpha_pattern": {"v_proj": 32, "o_proj": 2}},
            "lm_head": {"modules_to_save": ["lm_head"]}}
    out = {name: train_adapter(base, work / name, **kw) for name, kw in lora.items()}
    # the plain adapter once more, trained identically and saved in bfloat16
    out["bf16"] = train_adapter(base, work / "bf16", dtype=torch.bfloat16)
    assert read_adapter(out["bf16"]).tensors[next(iter(read_adapter(out["bf16"]).tensors))].dtype == torch.bfloat16
    return out


PROMPTS = [motif(k).tolist() * 2 for k in (0, 3)]  # 16 tokens each


def _greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the float32 logits that chose each, recomputed over the whole sequence at every step."""
    ids, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(STEPS):
            row = model(torch.tensor([ids])).logits[0, -1].float()
            rows.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt):], torch.stack(rows)


@pytest.fixture(scope="module")
def reference(base, adapters) -> dict[str, list[tuple[list[int], torch.Tensor]]]:
    """hf_lowrank's own model on the float32 base (no quantization) for each adapter, and the base alone."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    out = {"base": [_greedy(plain, p) for p in PROMPTS]}
    for name, folder in adapters.items():
        model = hf_lowrank.load(AutoModelForCausalLM, str(folder), quantization=None, dtype=torch.float32).eval()
        out[name] = [_greedy(model, p) for p in PROMPTS]
    return out


# ---- the engines ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm(base, adapters, work) -> dict[str, dict]:
    """vLLM's results per job. Refused adapters stop the engine for every later request, so the refused ones go
    last in the first engine (r16) and alone in a second (lm_head); each result keeps its engine's log."""
    results: dict[str, dict] = {}
    for i, names in enumerate((["base", "plain", "bf16", "rslora", "pattern", "r16"], ["lm_head"])):
        jobs = [{"name": n, "path": None if n == "base" else str(adapters[n])} for n in names]
        spec = work / f"vllm{i}.json"
        spec.write_text(json.dumps({"base": str(base), "max_lora_rank": MAX_LORA_RANK, "prompts": PROMPTS,
                                    "max_tokens": STEPS, "logprobs": 5, "jobs": jobs}))
        proc = _run(VLLM_ENV / "bin" / "python", HERE / "serving" / "vllm_driver.py", spec, work / f"vllm{i}.out",
                    log=work / f"vllm{i}.log")
        assert (work / f"vllm{i}.out").is_file(), f"vLLM did not start (exit {proc.returncode}):\n{proc.log[-6000:]}"
        for r in json.loads((work / f"vllm{i}.out").read_text()):
            results[r["name"]] = {**r, "log": proc.log}
    return results


@pytest.fixture(scope="module")
def gguf(base, adapters, work) -> dict[str, dict]:
    """The base in GGUF (llama.cpp's own converter, f32), and per adapter: our export (`hf-lowrank export --target
    llama.cpp`) and llama.cpp's convert_lora_to_gguf.py of the saved folder as it is, each path or refusal."""
    python = LLAMA_ENV / "bin" / "python"
    proc = _run(python, CONVERTERS / "convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile",
                work / "base.gguf", log=work / "base_gguf.log")
    assert proc.returncode == 0, proc.log[-4000:]
    out: dict[str, dict] = {"base": {"path": work / "base.gguf"}}
    for name, folder in adapters.items():
        entry: dict = {}
        try:
            entry["ours"], _ = export(read_adapter(folder, describe_only=True), "llama.cpp", work / f"{name}.gguf")
        except AdapterError as e:
            entry["ours_error"] = str(e)
        official = work / f"{name}.official.gguf"
        proc = _run(python, CONVERTERS / "convert_lora_to_gguf.py", folder, "--base", base, "--outtype", "f32",
                    "--outfile", official, log=work / f"{name}_official.log")
        entry["official"] = official if proc.returncode == 0 else None
        entry["official_log"] = proc.log
        out[name] = entry
    return out


@pytest.fixture(scope="module")
def llama_cpp(gguf, work) -> dict[str, dict]:
    """llama.cpp's results per job: `<name>` (our export), `<name>.official` (its converter's), `base`, and
    `plain.f16_cache` (our plain export with llama.cpp's default float16 KV cache)."""
    jobs = [{"name": "base", "lora": None}]
    for name, entry in gguf.items():
        if name == "base":
            continue
        if entry.get("ours"):
            jobs.append({"name": name, "lora": str(entry["ours"])})
        if entry.get("official"):
            jobs.append({"name": f"{name}.official", "lora": str(entry["official"])})
    jobs.append({"name": "plain.f16_cache", "lora": str(gguf["plain"]["ours"]), "f32_cache": False})
    spec = work / "llama.json"
    spec.write_text(json.dumps({"base": str(gguf["base"]["path"]), "prompts": PROMPTS, "max_tokens": STEPS,
                                "jobs": jobs}))
    proc = _run(LLAMA_ENV / "bin" / "python", HERE / "serving" / "llama_cpp_driver.py", spec, work / "llama.out",
                log=work / "llama.log")
    assert proc.returncode == 0, proc.log[-6000:]
    return {r["name"]: r for r in json.loads((work / "llama.out").read_text())}


# ---- comparisons ----------------------------------------------------------------------------------------------------


def vllm_agreement(ref, result) -> tuple[int, float]:
    """(greedy tokens equal, max |Δ logprob| over every top-5 token vLLM reported)."""
    equal, worst = 0, 0.0
    for (tokens, logits), got, steps in zip(ref, result["tokens"], result["logprobs"], strict=True):
        equal += sum(a == b for a, b in zip(tokens, got, strict=True))
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, step in enumerate(steps):
            assert {int(t) for t in step} == set(logprobs[i].topk(5).indices.tolist())  # the same top 5
            worst = max(worst, max(abs(logprobs[i, int(t)].item() - lp) for t, lp in step.items()))
    return equal, worst


def llama_agreement(ref, result) -> tuple[int, float]:
    """(greedy tokens equal, max |Δ logit| over the full vocabulary at every step)."""
    equal, worst = 0, 0.0
    for (tokens, logits), got, rows in zip(ref, result["tokens"], result["logits"], strict=True):
        equal += sum(a == b for a, b in zip(tokens, got, strict=True))
        worst = max(worst, (logits - torch.tensor(rows)).abs().max().item())
    return equal, worst


def test_the_comparison_sees_the_adapters(reference, vllm, llama_cpp):
    """Sanity: the engines agree with us on the base alone, and every adapter changes the greedy tokens."""
    assert vllm_agreement(reference["base"], vllm["base"])[0] == 2 * STEPS
    assert llama_agreement(reference["base"], llama_cpp["base"])[0] == 2 * STEPS
    base_tokens = [t for t, _ in reference["base"]]
    for name in EXPECTED:
        changed = sum(a != b for ours, theirs in zip([t for t, _ in reference[name]], base_tokens, strict=True)
                      for a, b in zip(ours, theirs, strict=True))
        assert changed >= STEPS, f"{name}: only {changed} of {2 * STEPS} greedy tokens differ from the base's"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_inspect_verdicts_are_what_the_engines_do(name, adapters, reference, vllm, gguf, llama_cpp, capsys):
    files = read_adapter(adapters[name], describe_only=True)
    stated = verdicts(files, max_lora_rank=MAX_LORA_RANK)
    assert {k: v.status for k, v in stated.items()} == EXPECTED[name]
    assert inspect_main([str(adapters[name]), "--max-lora-rank", str(MAX_LORA_RANK)]) == 0
    printed = capsys.readouterr().out
    for runtime, status in EXPECTED[name].items():  # the command prints the same verdicts
        assert re.search(rf"^  {re.escape(runtime)}\s+{status}\s", printed, re.M), printed

    # vLLM, serving the saved folder as it is
    served = vllm[name]
    if stated["vLLM"].status == ACCEPTED:
        assert served["ok"], served.get("error")
        equal, worst = vllm_agreement(reference[name], served)
        print(f"\nvLLM {name}: {equal}/{2 * STEPS} tokens, max |Δ logprob| = {worst:.1e}")
        assert equal == 2 * STEPS and worst <= VLLM_LOGPROB_BOUND
    else:
        assert not served["ok"], f"vLLM served {name}, which inspect says it refuses"
        assert VLLM_REFUSALS[name] in served["log"]
        assert stated["vLLM"].fix  # and the verdict says what to do instead
    # llama.cpp, serving our GGUF export, and the adapter converted as it is by llama.cpp's converter
    status, entry = stated["llama.cpp"].status, gguf[name]
    if status == REFUSED:
        assert "ours" not in entry and "merge instead" in entry["ours_error"]
        assert entry["official"] is None and LLAMA_CONVERTER_REFUSALS[name] in entry["official_log"]
        return
    equal, worst = llama_agreement(reference[name], llama_cpp[name])
    print(f"llama.cpp {name} (our GGUF): {equal}/{2 * STEPS} tokens, max |Δ logit| = {worst:.1e}")
    assert equal == 2 * STEPS and worst <= LLAMA_LOGIT_BOUND
    equal, worst = llama_agreement(reference[name], llama_cpp[f"{name}.official"])
    print(f"llama.cpp {name} (convert_lora_to_gguf.py as saved): {equal}/{2 * STEPS} tokens, "
          f"max |Δ logit| = {worst:.1e}")
    if status == ACCEPTED:
        assert equal == 2 * STEPS and worst <= LLAMA_LOGIT_BOUND
    else:  # needs export: as it is, llama.cpp computes something else, silently
        assert worst >= WRONG


def test_our_gguf_equals_llamas_converter_where_nothing_is_folded(gguf):
    """For an adapter llama.cpp reads as it is, our writer's tensors are bit for bit its converter's (names, shapes,
    q/k row order); the metadata that matters too."""
    import gguf as gg

    ours, theirs = gg.GGUFReader(gguf["plain"]["ours"]), gg.GGUFReader(gguf["plain"]["official"])
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    assert sorted(a) == sorted(b) and len(a) == 2 * 14  # 2 layers × 7 projections × (lora_a, lora_b)
    for k in a:
        assert a[k].data.shape == b[k].data.shape and (a[k].data == b[k].data).all(), k
    for f in (ours, theirs):
        assert bytes(f.fields["general.type"].parts[-1]).decode() == "adapter"
        assert bytes(f.fields["adapter.type"].parts[-1]).decode() == "lora"
        assert float(f.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0


def test_llama_cpp_default_f16_cache_stays_close(reference, llama_cpp):
    equal, worst = llama_agreement(reference["plain"], llama_cpp["plain.f16_cache"])
    print(f"\nllama.cpp plain, float16 KV cache: {equal}/{2 * STEPS} tokens, max |Δ logit| = {worst:.1e}")
    assert equal == 2 * STEPS and worst <= LLAMA_F16_CACHE_BOUND


def test_export_for_vllm_refuses_what_vllm_refuses(adapters, work):
    """`export --target vllm` writes nothing for the adapters the engine refused above, and says what to do."""
    for name, fix in (("lm_head", "merge instead"), ("r16", "start vLLM with max_lora_rank=16")):
        with pytest.raises(AdapterError, match=re.escape(fix)):
            export(read_adapter(adapters[name]), "vllm", work / f"{name}.vllm", max_lora_rank=MAX_LORA_RANK)
        assert not (work / f"{name}.vllm").exists()
