"""hf-lowrank against PEFT + bitsandbytes: the same QLoRA job, side by side, on CPU.

Both sides load the same random-init Llama-shaped checkpoint (saved to a temporary folder, loaded back through
`from_pretrained`; nothing from the Hub), quantize it to NF4 with double quantization and bf16 compute, put r=16
LoRA on every linear layer but the head (alpha 32, dropout 0.05), and train with torch AdamW on the same batch with
non-reentrant gradient checkpointing:

    ours  hf_lowrank.from_pretrained(AutoModelForCausalLM, path, LowRankConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    PEFT  AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(NF4, DQ, bf16))
          → prepare_model_for_kbit_training → get_peft_model(LoraConfig(r=16, lora_alpha=32,
          target_modules="all-linear", lora_dropout=0.05))

Every run is its own process (peak RSS is per process) and runs alternate (ours, PEFT, ours, PEFT, ...), so a
slow patch of the machine hits both sides. The table gives, per cell (model size × sequence length), the median of
the runs for: load + quantize (+ k-bit preparation) time, injection time, median train step, peak RSS (whole
process, and above the RSS right after the imports), adapter save and load time, adapter file bytes against the
bytes of its tensors, and the trainable-parameter count (asserted equal on both sides).

    python benchmarks/compare_peft.py --quick          # 4 blocks × 512, seq 128 only (a few minutes on 2 cores)
    python benchmarks/compare_peft.py                  # the full table: both sizes, seq 128 and 512
    python benchmarks/compare_peft.py --sizes small --seqs 128,512 --repeats 2
    python benchmarks/compare_peft.py --smoke          # tiny shapes, seconds: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Llama-shaped models: (blocks, hidden, intermediate, heads, vocab). Intermediate ≈ 2.7 × hidden as in Llama 2,
#: rounded to a multiple of 64 (bitsandbytes' CPU kernels want it).
SIZES = {
    "tiny": (2, 128, 256, 4, 256),
    "small": (4, 512, 1408, 8, 2048),
    "large": (12, 1024, 2752, 16, 2048),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)

# (label, key, target ratio ours/PEFT or None, unit)
METRICS = [
    ("load + quantize", "load_s", None, "s"),
    ("injection", "inject_s", None, "s"),
    ("train step (median)", "step_s", None, "s"),
    ("train step, CPU time (median)", "step_cpu_s", None, "s"),
    ("train step, interleaved in one process", "step_interleaved_s", 0.9, "s"),
    ("peak RSS", "peak_rss_mib", 0.9, "MiB"),
    ("peak RSS above imports, loading", "load_rss_delta_mib", 0.9, "MiB"),
    ("peak RSS above imports, training", "train_rss_delta_mib", 0.9, "MiB"),
    ("adapter save", "save_s", None, "s"),
    ("adapter save, interleaved in one process", "save_interleaved_s", 0.5, "s"),
    ("adapter save, interleaved, without the fsync wait", "save_nofsync_s", None, "s"),
    ("adapter save, interleaved, above writing the bytes", "save_above_floor_s", None, "s"),
    ("adapter load", "adapter_load_s", None, "s"),
    ("adapter load, interleaved in one process", "load_interleaved_s", 0.5, "s"),
    ("adapter file bytes", "adapter_bytes", None, "B"),
    ("adapter file − tensor bytes", "adapter_overhead_bytes", None, "B"),
]


# ---- the worker: one side, one cell, one process -------------------------------------------------------------------


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the peak measured afterwards belongs to what follows."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _release_freed_memory() -> None:
    """Return what the loader freed to the OS (both sides alike), so the training peak measures live memory rather
    than what glibc happened to keep of the loading buffers."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _load_ours(path: str):
    from transformers import AutoModelForCausalLM

    import hf_lowrank
    import hf_lowrank.loading as hook

    timing = {}
    real_inject = hook._inject

    def timed_inject(model, config):
        t = time.perf_counter()
        out = real_inject(model, config)
        timing["inject_s"] = time.perf_counter() - t
        return out

    hook._inject = timed_inject  # only to split the one call's time into loading and injection
    try:
        t0 = time.perf_counter()
        model = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, hf_lowrank.LowRankConfig(**LORA))
        total = time.perf_counter() - t0
    finally:
        hook._inject = real_inject
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, total - timing["inject_s"], timing["inject_s"]


def _load_peft(path: str, device_map=None):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map=device_map or {"": "cpu"})
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    return model, load_s, time.perf_counter() - t0


def _save(side: str, model, folder: Path) -> None:
    if side == "ours":
        import hf_lowrank

        hf_lowrank.save_adapter(model, folder)
    else:
        model.save_pretrained(folder)


def _load(side: str, model, folder: Path) -> None:
    """Load the adapter in `folder` into the already-injected `model`."""
    if side == "ours":
        import hf_lowrank

        hf_lowrank.load_adapter(model, folder)
    else:
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        assert not result.unexpected_keys, result.unexpected_keys


class _FsyncClock:
    """Adds up the time spent inside `os.fsync` while active: ours flushes every file to disk before renaming it
    (crash safety), PEFT does not flush, so the table also shows our save without that wait."""

    def __init__(self):
        self.total = 0.0
        self._real = os.fsync

    def __enter__(self):
        def timed(fd):
            t0 = time.perf_counter()
            try:
                return self._real(fd)
            finally:
                self.total += time.perf_counter() - t0

        os.fsync = timed
        return self

    def __exit__(self, *exc):
        os.fsync = self._real


def _save_and_load(side: str, model, tmp: Path, repeats: int = 3) -> dict:
    """Median adapter save and load time (fresh folder each save; load into the already-injected model)."""
    import torch

    saves, loads = [], []
    folder = tmp
    for i in range(repeats):
        folder = tmp / f"adapter{i}"
        t0 = time.perf_counter()
        _save(side, model, folder)
        saves.append(time.perf_counter() - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _load(side, model, folder)
        loads.append(time.perf_counter() - t0)
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as f:
        tensor_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    size = weights.stat().st_size
    del torch
    return {"save_s": statistics.median(saves), "adapter_load_s": statistics.median(loads), "adapter_bytes": size,
            "adapter_tensor_bytes": tensor_bytes, "adapter_overhead_bytes": size - tensor_bytes}


def _common_imports() -> None:
    """What either side ends up importing (the Llama modeling code, bitsandbytes, the Trainer): imported before the
    clocks and the RSS baseline start, so one-off import costs count for neither side."""
    import bitsandbytes  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401


def worker(args) -> dict:
    """Load, inject, train `--steps` steps, save and load the adapter; return the measurements as a dict."""
    import torch

    _common_imports()
    if args.side == "peft":
        import peft  # noqa: F401
    else:
        import hf_lowrank  # noqa: F401
    torch.set_num_threads(args.threads)
    import_rss = _rss_mib()
    _reset_peak_rss()

    model, load_s, inject_s = (_load_ours if args.side == "ours" else _load_peft)(args.model)
    load_peak = _rss_mib("VmHWM")
    _release_freed_memory()
    _reset_peak_rss()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.seq), generator=g)

    times, cpu_times, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(loss.item())
    for p in params:
        if p.grad is not None:
            raise AssertionError("zero_grad left a gradient")
    train_peak = _rss_mib("VmHWM")
    peak = max(load_peak, train_peak)
    with tempfile.TemporaryDirectory() as tmp:
        files = _save_and_load(args.side, model, Path(tmp))
    return {"side": args.side, "load_s": load_s, "inject_s": inject_s, "trainable": trainable,
            "step_s": statistics.median(times[args.warmup:]),
            "step_cpu_s": statistics.median(cpu_times[args.warmup:]), "first_loss": losses[0], "last_loss": losses[-1],
            "import_rss_mib": import_rss, "peak_rss_mib": peak, "load_rss_delta_mib": load_peak - import_rss,
            "train_rss_delta_mib": train_peak - import_rss, **files}


def interleaved_worker(args) -> dict:
    """Both models in one process, training steps alternating ours / PEFT (who goes first alternates too): on a
    shared machine, load that comes and goes then hits both sides alike, so the ratio is steadier than across runs."""
    import torch

    _common_imports()
    import peft  # noqa: F401

    torch.set_num_threads(args.threads)
    sides = {}
    for side, load in (("ours", _load_ours), ("peft", _load_peft)):
        model = load(args.model)[0]
        model.train()
        sides[side] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    ids = torch.randint(1, sides["ours"][0].config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    times = {"ours": [], "peft": []}
    order = ["ours", "peft"]
    for i in range(args.warmup + args.steps):
        for side in order if i % 2 == 0 else order[::-1]:
            model, opt = sides[side]
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[side].append(time.perf_counter() - t0)
    pairs = [o / p for o, p in zip(times["ours"][args.warmup:], times["peft"][args.warmup:], strict=True)]
    out = {"ours_step_s": statistics.median(times["ours"][args.warmup:]),
           "peft_step_s": statistics.median(times["peft"][args.warmup:]), "pair_ratio": statistics.median(pairs)}
    with tempfile.TemporaryDirectory() as tmp:
        out.update(_interleaved_save_load({side: model for side, (model, _) in sides.items()}, Path(tmp),
                                          args.file_rounds))
    return out


def _interleaved_save_load(models: dict, tmp: Path, rounds: int) -> dict:
    """Adapter saves (each into a fresh folder), then loads, alternating ours / PEFT round by round (who goes first
    alternates too); medians. For ours also the save time less the time spent waiting in fsync; for both the save
    time less the I/O floor: `safetensors.torch.save_file` of the same tensors into a fresh file (no fsync), timed
    in the same round (on a VM whose disk is throttled at times, writing the bytes is most of both saves)."""
    from safetensors.torch import load_file, save_file

    saves = {"ours": [], "peft": []}
    loads = {"ours": [], "peft": []}
    above = {"ours": [], "peft": []}
    nofsync = []
    order = ["ours", "peft"]
    tensors = None
    for i in range(rounds + 1):  # round 0 warms up (first-call imports) and is not counted
        floor = float("nan")
        if tensors is not None:
            t0 = time.perf_counter()
            save_file(tensors, str(tmp / f"floor{i}.safetensors"))
            floor = time.perf_counter() - t0
        for side in order if i % 2 == 0 else order[::-1]:
            with _FsyncClock() as clock:
                t0 = time.perf_counter()
                _save(side, models[side], tmp / f"{side}{i}")
                elapsed = time.perf_counter() - t0
            if i:
                saves[side].append(elapsed)
                above[side].append(elapsed - floor)
                if side == "ours":
                    nofsync.append(elapsed - clock.total)
        if tensors is None:
            tensors = load_file(str(tmp / "peft0" / "adapter_model.safetensors"))
    for i in range(rounds + 1):
        for side in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            _load(side, models[side], tmp / f"{side}{rounds}")
            if i:
                loads[side].append(time.perf_counter() - t0)
    out = {f"{side}_{kind}": statistics.median(values[side]) for kind, values in (("save_s", saves), ("load_s", loads))
           for side in order}
    out["ours_save_nofsync_s"] = statistics.median(nofsync)
    out.update({f"{side}_save_above_floor_s": statistics.median(above[side]) for side in order})
    return out


# ---- the driver ----------------------------------------------------------------------------------------------------


def make_model(folder: Path, size: str) -> str:
    """A random-init Llama-shaped checkpoint in bf16, saved to `folder` (as a real one would be on disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks, hidden, inter, heads, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def run_side(side: str, model: str, seq: int, batch: int, steps: int, warmup: int, threads: int,
             file_rounds: int = 9) -> dict:
    """One worker process (`side` is "ours", "peft" or "both" for the interleaved step timing); its JSON result."""
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--seq", str(seq), "--batch", str(batch),
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--file-rounds", str(file_rounds)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        out[key] = statistics.median(r[key] for r in runs) if isinstance(value, (int, float)) else value
    return out


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        return f"{int(value):,}"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.0f} {unit}"


def table(cells: list[tuple[str, dict, dict]]) -> str:
    lines = ["| cell | metric | ours | PEFT | ours/PEFT | target |", "|---|---|---:|---:|---:|---|"]
    for name, ours, peft in cells:
        for label, key, target, unit in METRICS:
            if ours[key] != ours[key]:  # NaN: not measured
                continue
            ratio = ours[key] / peft[key] if peft[key] else float("nan")
            verdict = "" if target is None else (f"≤ {target} ✓" if ratio <= target else f"≤ {target} ✗")
            lines.append(f"| {name} | {label} | {_fmt(ours[key], unit)} | {_fmt(peft[key], unit)} | {ratio:.2f} | "
                         f"{verdict} |")
        lines.append(f"| {name} | trainable params | {int(ours['trainable']):,} | {int(peft['trainable']):,} | "
                     f"{ours['trainable'] / peft['trainable']:.2f} | equal ✓ |")
        lines.append(f"| {name} | loss (first → last step) | {ours['first_loss']:.3f} → {ours['last_loss']:.3f} | "
                     f"{peft['first_loss']:.3f} → {peft['last_loss']:.3f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,large", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--seqs", default="128,512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default: 5; 3 for 'large')")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and cell, alternating ours/PEFT")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1 by default: on a small shared machine two OpenMP threads wait on "
                        "each other whenever one is descheduled, and the timings become noise)")
    p.add_argument("--quick", action="store_true", help="the smallest cell only: small × seq 128")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, one run per side: checks the script")
    p.add_argument("--json", help="also write the raw runs to this file")
    p.add_argument("--interleaved-steps", type=int, default=None,
                   help="steps per side in the one-process interleaved timing (default: --steps; 0 skips it)")
    p.add_argument("--file-rounds", type=int, default=9,
                   help="adapter saves and loads per side in the one-process interleaved timing")
    p.add_argument("--worker", choices=["ours", "peft", "both"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.side = args.worker
        print(json.dumps(interleaved_worker(args) if args.worker == "both" else worker(args)))
        return 0
    if args.quick:
        args.sizes, args.seqs = "small", "128"
    if args.smoke:
        args.sizes, args.seqs, args.batch, args.repeats, args.warmup = "tiny", "32", 2, 1, 0
        args.file_rounds = 2
        args.steps = args.steps or 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
    seqs = [int(s) for s in args.seqs.split(",")]

    cells, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = make_model(Path(tmp) / size, size)
            blocks, hidden = SIZES[size][:2]
            for seq in seqs:
                steps = args.steps or (3 if size == "large" else 5)
                runs = {"ours": [], "peft": []}
                for _ in range(args.repeats):
                    for side in ("ours", "peft"):
                        runs[side].append(run_side(side, path, seq, args.batch, steps, args.warmup, args.threads))
                        print(f"# {size} seq {seq} {side}: step {runs[side][-1]['step_s']:.3f} s, peak RSS "
                              f"{runs[side][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
                ours, peft = median_of(runs["ours"]), median_of(runs["peft"])
                n = steps if args.interleaved_steps is None else args.interleaved_steps
                if n:
                    both = run_side("both", path, seq, args.batch, n, args.warmup, args.threads, args.file_rounds)
                    for key, name in (("step_interleaved_s", "step_s"), ("save_interleaved_s", "save_s"),
                                      ("load_interleaved_s", "load_s")):
                        ours[key], peft[key] = both[f"ours_{name}"], both[f"peft_{name}"]
                    ours["save_nofsync_s"], peft["save_nofsync_s"] = both["ours_save_nofsync_s"], both["peft_save_s"]
                    ours["save_above_floor_s"] = both["ours_save_above_floor_s"]
                    peft["save_above_floor_s"] = both["peft_save_above_floor_s"]
                    runs["interleaved"] = both
                else:
                    for key in ("step_interleaved_s", "save_interleaved_s", "load_interleaved_s", "save_nofsync_s",
                                "save_above_floor_s"):
                        ours[key] = peft[key] = float("nan")
                if ours["trainable"] != peft["trainable"]:
                    raise AssertionError(f"trainable counts differ: ours {ours['trainable']:,} vs PEFT "
                                         f"{peft['trainable']:,}; the two sides do not train the same adapters")
                name = f"{blocks}×{hidden}, seq {seq}"
                cells.append((name, ours, peft))
                raw.append({"cell": name, "batch": args.batch, "steps": steps, **runs})
    print(f"QLoRA (NF4 + double quant, bf16 compute), r=16 all-linear, batch {args.batch}, AdamW, non-reentrant "
          f"gradient checkpointing, {args.threads} threads, {args.repeats} alternating run(s) per side (medians)\n")
    print(table(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
