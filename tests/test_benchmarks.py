"""The benchmark scripts run end to end on tiny shapes and print complete tables (no timings are asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.slow
def test_compare_peft_smoke_prints_every_row(tmp_path):
    cp = _module("compare_peft")
    out = _run("compare_peft.py", "--smoke", "--json", str(tmp_path / "raw.json"))
    rows = [line for line in out.splitlines() if line.startswith("| 2×128, seq 32 |")]
    labels = [row.split("|")[2].strip() for row in rows]
    assert labels == [m[0] for m in cp.METRICS] + ["trainable params", "loss (first → last step)"]
    raw = json.loads((tmp_path / "raw.json").read_text())
    ours, peft = raw[0]["ours"][0], raw[0]["peft"][0]
    # 2 blocks × (q, k, v, o: 16·(128+128); gate, up, down: 16·(128+256)) = 2 × 34,816
    assert ours["trainable"] == peft["trainable"] == 69_632
    assert "| 69,632 | 69,632 | 1.00 | equal ✓ |" in out
    # same base, B = 0 at the start: both sides begin from the same loss (NF4 codes identical; bf16 vs fp32 norms)
    assert abs(ours["first_loss"] - peft["first_loss"]) < 0.02, (ours["first_loss"], peft["first_loss"])
    # adapter file = tensor bytes + a small header (the bound: 64 KiB)
    assert ours["adapter_tensor_bytes"] == 69_632 * 4
    assert 0 < ours["adapter_overhead_bytes"] <= 64 * 1024


@pytest.mark.slow
def test_gpu_cpu_tiny_prints_every_row(tmp_path):
    out = _run("gpu.py", "--cpu-tiny", "--json", str(tmp_path / "raw.json"))
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows[:2]] == ["1", "2"], out  # throughput rows, batch 1 and 2
    assert len(rows) == 5, out  # + 2 floor rows + 1 dequantization row
    raw = json.loads((tmp_path / "raw.json").read_text())
    run = raw["runs"][0]
    assert run["ours"]["trainable"] == run["peft"]["trainable"] == 65_536
    assert all("peak_bytes" in r for r in run["ours"]["results"] + run["peft"]["results"])
    assert raw["dequant"]["tiny"]["gbs"] > 0


@pytest.mark.parametrize(("size", "lora"), [("1b", 11_272_192), ("8b", 41_943_040)])
def test_floor_matches_known_llama_counts(size, lora):
    """LoRA r=16 on all linear layers of Llama 3.2 1B / 3.1 8B: the trainable counts PEFT prints for them."""
    gpu = _module("gpu")
    f = gpu.floor_bytes(size, batch=1, seq=2048)
    assert f["lora_params"] == lora
    assert f["lora"] == 16 * lora
    if size == "8b":  # 8,030,261,248 params in all: 2 × 128256 × 4096 embeddings, 65 norms of 4096, the rest linear
        linear = 8_030_261_248 - 2 * 128_256 * 4096 - 65 * 4096
        assert f["weights"] == pytest.approx(linear * 4.127 / 8)
        assert f["embeddings"] == 2 * (2 * 128_256 * 4096 + 65 * 4096)
        assert f["activations"] == 32 * 2048 * 4096 * 2


def test_optimizer_step_compares_the_same_work():
    out = _run("optimizer_step.py", "--blocks", "1", "--hidden", "128", "--intermediate", "256", "--steps", "2")
    assert out.startswith("14 LoRA tensors, 34,816 parameters")  # 7 layers × (A, B); 16·(4·256 + 3·384)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| bitsandbytes") or
            line.startswith("| torch")]
    assert [r[0].strip() for r in rows] == ["bitsandbytes PagedAdamW32bit (Trainer default)", "torch AdamW, for-loop",
                                             "torch AdamW, foreach", "torch AdamW, fused"]
    assert rows[0][2].strip() == "1.00"
    # four steps of the same AdamW from the same start: every implementation lands on the same parameters
    assert all(float(r[3]) < 1e-6 for r in rows), rows


@pytest.mark.slow
def test_dpo_benchmark_smoke_prints_every_row():
    """The DPO comparison runs all three sides through TRL and prints each row with its target (values not
    asserted: a smoke run measures nothing)."""
    out = _run("dpo.py", "--smoke", timeout=600)
    rows = [line for line in out.splitlines() if line.startswith("| DPO ")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "DPO train step (peft-dpo)", "DPO peak RSS (peft-dpo)", "DPO peak RSS vs our SFT peak (ours-sft)",
        "DPO training peak above the start (peft-dpo)", "DPO training peak above the start vs our SFT's (ours-sft)"]
    assert all("≤ 0.9" in r for r in rows[:2]) and "≤ 1.15" in rows[2]
    assert "Last DPO loss: ours nan" not in out  # both sides really trained and logged a loss


@pytest.mark.slow
def test_quality_smoke_prints_dora_cost_and_file_sizes():
    import re

    out = _run("quality.py", "--smoke")
    rows = {m[0]: m[1:] for m in re.findall(r"^\| (LoRA|DoRA) \| ([\d.]+) ms .*? \| ([\d.]+) MiB .*? \| ([-\d.]+) MiB",
                                             out, re.M)}
    assert set(rows) == {"LoRA", "DoRA"}, out
    # DoRA keeps more for its backward than LoRA on the same model and batch (g⊙W0·x and g⊙s·B·A·x, per layer)
    assert float(rows["DoRA"][1]) > float(rows["LoRA"][1]) > 0, rows
    assert "| + 3 token rows (trainable_token_indices) | 62,144 | 3,208 |" in out, out
    assert "| + embed_tokens as modules_to_save | 1,110,728 | 1,051,792 |" in out, out
