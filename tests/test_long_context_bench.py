"""benchmarks/long_context.py and gpu.py --long-context run end to end on tiny shapes and print complete tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 400) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_long_context_quick_prints_every_cell():
    out = _run("benchmarks/long_context.py", "--quick")
    assert "Ours' loss path: vocab 512: fused linear+cross-entropy" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 512 | 1 × ")]
    assert [r[1].strip() for r in rows] == ["1 × 32", "1 × 64"]
    for r in rows:
        assert len(r) == 15 and all(c.strip() for c in r), r
        assert "≤ 0.9" in r[10] and "≤ 1.15" in r[12]  # step ratio and floor ratio carry their targets
        assert abs(float(r[13]) - float(r[14])) < 0.02  # same NF4 base, B = 0: both sides start from one loss
    growth = [line for line in out.splitlines() if line.startswith("| 512 | ") and "≤ 0.5" in line]
    assert len(growth) == 1


@pytest.mark.slow
def test_gpu_long_context_cpu_tiny():
    out = _run("benchmarks/gpu.py", "--long-context", "--cpu-tiny")
    rows = [line for line in out.splitlines() if line.startswith("| 512 | ")]
    assert len(rows) == 2 + 1, out  # 2 sequence lengths, + the growth row
    assert all("OOM" not in r and "–" not in r for r in rows), out


@pytest.mark.slow
def test_floor_only_with_both_products_prints_the_extra_columns():
    """`--products both`: ours with the library's choice of the rank-r products' dtype, the same model with them
    forced into bf16, and the floor, alternating; a row per cell with the two ratios and their rounds."""
    out = _run("benchmarks/long_context.py", "--quick", "--floor-only", "--products", "both")
    assert "| ours, bf16 products | ours/that | per round |" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 512 | 1 × ")]
    assert [r[1].strip() for r in rows] == ["1 × 32", "1 × 64"]
    for r in rows:
        assert len(r) == 10 and all(c.strip() for c in r), r
        assert "≤ 1.15" in r[4] and float(r[8]) > 0 and len(r[9].split()) == 1, r  # --quick: one round


def test_products_both_without_floor_only_is_refused_by_name():
    """`--products both` is a column of the --floor-only table only: without it the script stops at once, naming
    both flags, before building any model."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "benchmarks/long_context.py", "--products", "both"], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "--products both" in proc.stderr and "--floor-only" in proc.stderr and proc.stdout == "", proc.stderr


@pytest.mark.slow
def test_phases_split_ours_step_into_disjoint_parts():
    """`--phases`: each timed part of ours' LoRA layers is measured (the wrappers fired: dropout drawn and applied,
    the node's own work, its backward), the floor's step (adapters disabled) runs no dropout and no LoRA node, and
    the parts are disjoint: what is left of
    each side's step ("everything else") is not negative."""
    out = _run("benchmarks/long_context.py", "--quick", "--phases", "32:512:2")
    rows = {r[0].strip(): r[1:] for r in (line.split("|")[1:-1] for line in out.splitlines()
                                          if line.startswith("| ") and " ms |" in line)}

    def ms(cell: str) -> float:
        value, unit = cell.split()
        return float(value) * (1000 if unit == "s" else 1)

    assert len(rows) == 8, out
    for name in ("dropout: drawing the positions", "dropout: the zeroed copy of x",
                 "ours' node forward, the rest (rank-r products, casts, saving)"):
        assert ms(rows[name][1]) == 0 and ms(rows[name][0]) >= 0, rows[name]
    assert ms(rows["dropout: drawing the positions"][0]) > 0, rows  # LoRA dropout 0.05: drawn on every call
    parts = [k for k in rows if k.startswith(("base layers'", "dropout", "ours' node", "backward of"))]
    assert len(parts) == 5 and all(ms(rows[k][0]) > 0 for k in parts if not k.startswith("dropout")), rows
    assert ms(rows["step (wall)"][0]) >= sum(ms(rows[k][0]) for k in parts), rows
    else_row = next(k for k in rows if k.startswith("everything else"))
    assert ms(rows[else_row][0]) >= 0 and ms(rows[else_row][1]) >= 0, rows
