"""Issue 16's measured effects: DoRA's step-time and memory cost against plain LoRA (NF4 base), and the adapter file
size of trainable new-token rows against the whole embedding as modules_to_save.

    python benchmarks/quality.py            # CPU (or the GPU when there is one), tiny Llama, ~2 minutes
    python benchmarks/quality.py --smoke    # tiny steps: checks the script, measures nothing

Step times are medians over alternating runs (LoRA, DoRA, LoRA, ...) in one process, so a busy machine slows both
alike. Memory, three ways: the bytes autograd keeps for the backward of one step (unique storages, counted by
`torch.autograd.graph.saved_tensors_hooks`: exact and machine-independent), the training peak of a process of its
own per variant (runs alternating; RSS above what the process held before its first step on a CPU,
`torch.cuda.max_memory_allocated` above the same point on a GPU), medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_lowrank

HIDDEN, VOCAB = 256, 1024


def base(folder: Path, n_tokens: int = VOCAB) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    model.save_pretrained(folder)
    return str(folder)


VARIANTS = {"LoRA": False, "DoRA": True}
BATCH, SEQ = 4, 128


def _model(path: str, device: str, dora: bool):
    cfg = hf_lowrank.LowRankConfig(r=16, lora_alpha=32, use_dora=dora, lora_dropout=0.0,
                                   compute_dtype="bfloat16" if device == "cuda" else "float32")
    return hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg, device_map={"": device}).train()


def _step(model, opt, x) -> None:
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def step_cost(path: str, device: str, rounds: int, steps: int) -> dict[str, float]:
    """Median step time (ms) per variant, both models in this process, run by run alternating."""
    models = {name: _model(path, device, dora) for name, dora in VARIANTS.items()}
    x = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(model, opt, x)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def saved_bytes(path: str, device: str) -> dict[str, int]:
    """Bytes of the distinct storages autograd keeps for one forward's backward, per variant."""
    x = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    out = {}
    for name, dora in VARIANTS.items():
        model = _model(path, device, dora)
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, labels=x).loss
        loss.backward()
        out[name] = sum(storages.values())
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_worker(path: str, variant: str, device: str, steps: int) -> float:
    """The training peak (MiB) of this process above what it held before its first step."""
    model = _model(path, device, VARIANTS[variant])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import ctypes
        import gc

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
        before = _rss_mib("VmRSS")
    for _ in range(steps):
        _step(model, opt, x)
    if device == "cuda":
        _sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return _rss_mib("VmHWM") - before


def memory_cost(path: str, rounds: int, steps: int) -> dict[str, float]:
    """Median training peak per variant, each run a process of its own, the variants alternating."""
    peaks: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", name, "--model", path,
                                   "--steps", str(steps)], capture_output=True, text=True, check=True)
            peaks[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])
    return {n: statistics.median(v) for n, v in peaks.items()}


def file_sizes(tmp: Path) -> dict[str, int]:
    path = base(tmp / "resized", VOCAB + 3)
    new = [VOCAB, VOCAB + 1, VOCAB + 2]
    out = {}
    variants = (("LoRA only", {}), ("+ 3 token rows (trainable_token_indices)", {"trainable_token_indices": new}),
                ("+ embed_tokens as modules_to_save", {"modules_to_save": ["embed_tokens"]}))
    for name, extra in variants:
        cfg = hf_lowrank.LowRankConfig(r=8, target_modules=["q_proj", "v_proj"], quantization=None, **extra)
        model = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg)
        model.save_pretrained(tmp / name)
        out[name] = (tmp / name / "adapter_model.safetensors").stat().st_size
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (step time and memory)")
    p.add_argument("--steps", type=int, default=4, help="steps per run")
    p.add_argument("--smoke", action="store_true", help="1 round of 1 step: checks the script, measures nothing")
    p.add_argument("--memory-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.steps = 1, 1
    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_worker:
        print(json.dumps({"peak_mib": memory_worker(args.model, args.memory_worker, device, args.steps)}))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = base(tmp / "base")
        times = step_cost(path, device, args.rounds, args.steps)
        saved = saved_bytes(path, device)
        peaks = memory_cost(path, args.rounds, args.steps)
        where = "RSS" if device == "cpu" else "CUDA allocated"
        print(f"DoRA vs LoRA, NF4 tiny Llama (hidden {HIDDEN}, 2 layers, batch {BATCH} x {SEQ}, r=16, all-linear), "
              f"{device}")
        print(f"| adapter | step time (median) | saved for backward | training peak ({where}, above the start) |")
        print("|---|---|---|---|")
        for name in VARIANTS:
            print(f"| {name} | {times[name]:.1f} ms ({times[name] / times['LoRA']:.2f}x) | "
                  f"{saved[name] / 2**20:.2f} MiB ({saved[name] / saved['LoRA']:.2f}x) | "
                  f"{peaks[name]:.1f} MiB ({peaks[name] / max(peaks['LoRA'], 1e-9):.2f}x) |")
        sizes = file_sizes(tmp)
        lora = sizes["LoRA only"]
        print(f"\nadapter file sizes (hidden {HIDDEN}, vocab {VOCAB} + 3 added tokens, fp32)")
        print("| adapter | bytes | more than LoRA only |")
        print("|---|---|---|")
        for name, n in sizes.items():
            print(f"| {name} | {n:,} | {n - lora:,} |")
        print(f"(3 x hidden x 4 = {3 * HIDDEN * 4:,}; vocab x hidden x 4 = {(VOCAB + 3) * HIDDEN * 4:,})")


if __name__ == "__main__":
    main()
