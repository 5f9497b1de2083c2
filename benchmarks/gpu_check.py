"""Run the two-line script under each integrations/ config for a few steps and print one table.

    python benchmarks/gpu_check.py                 # GPUs: a 16-layer Llama-shaped model, 20 steps per setup
    python benchmarks/gpu_check.py --size large    # GPUs: a TinyLlama-sized (1.1B) model
    python benchmarks/gpu_check.py --cpu           # no GPU: tiny shapes, 2 processes over gloo (about 2 minutes)

Columns: setup, ok (exit 0 and a complete adapter: every tensor present and non-empty), step time (median over the
steps after the first two), peak memory (GPU: torch.cuda.max_memory_allocated on rank 0; CPU: max RSS of rank 0),
adapter bytes (adapter_model.safetensors). The base model is random-init, built from a config and saved locally
(nothing is downloaded). One GPU: DDP is skipped (it needs two), FSDP and DeepSpeed run with one process. Each
launch has a time limit and the script stops launching when its budget (default 9 minutes) is spent, so it finishes
in under 10 minutes on one GPU.

The worker (`--worker`, started by `accelerate launch`) is an ordinary Trainer script plus the two lines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "integrations" / "accelerate"
SETUPS = ("ddp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3_qlora")
#: Llama shapes: (layers, hidden, intermediate, heads, kv heads, vocab)
SIZES = {
    "tiny": (2, 128, 256, 4, 2, 256),
    "medium": (16, 1024, 2816, 16, 4, 32000),
    "large": (22, 2048, 5632, 32, 4, 32000),
}


# ---- the worker: a plain Trainer script plus two lines -------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch

    import hf_lowrank

    hf_lowrank.enable(r=16, lora_alpha=32)

    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    on_gpu = torch.cuda.is_available() and not args.cpu
    model = AutoModelForCausalLM.from_pretrained(args.model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, vocab, (256, args.seq), generator=g)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=args.out, use_cpu=not on_gpu, bf16=on_gpu, max_steps=args.steps, per_device_train_batch_size=4,
        learning_rate=1e-4, logging_steps=5, save_strategy="no", report_to=[], gradient_checkpointing=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainer.save_model(os.path.join(args.out, "adapter"))
    if not trainer.args.should_save:
        return
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # gaps[i]: step i+2
    steps = gaps[2:] or gaps  # the first steps include warm-up (allocations, kernel and op builds)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"step_s": statistics.median(steps) if steps else None, "peak_bytes": peak,
                   "world_size": trainer.args.world_size, "device": "cuda" if on_gpu else "cpu"}, f)


# ---- the driver ------------------------------------------------------------------------------------------------------


def build_model(folder: Path, size: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setup(setup: str, model: str, work: Path, args: argparse.Namespace, n_gpus: int) -> dict:
    out = work / setup
    row = {"setup": setup, "ok": False, "step_s": None, "peak_bytes": None, "adapter_bytes": None, "note": ""}
    procs = 2 if args.cpu else n_gpus
    if setup == "ddp" and procs < 2:
        return {**row, "note": "skipped: DDP needs 2 GPUs"}
    if setup == "fsdp_qlora" and args.cpu:
        return {**row, "note": "skipped: accelerate's FSDP needs GPUs (tests cover FSDP2 on CPU with fully_shard)"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(CONFIGS / f"{setup}.yaml"), "--num_processes", str(procs), "--main_process_port", str(_port()),
           __file__, "--worker", "--model", model, "--out", str(out), "--steps", str(args.steps), "--seq",
           str(args.seq)] + (["--cpu"] if args.cpu else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    log = work / f"{setup}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.launch_timeout)
    except subprocess.TimeoutExpired:
        return {**row, "note": f"timed out after {args.launch_timeout}s (log: {log})"}
    if proc.returncode != 0:
        last = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line][-1:]
        return {**row, "note": f"exit {proc.returncode}: {last[0][:160] if last else ''} (log: {log})"}
    from hf_lowrank.state import AdapterError, read_adapter

    try:
        read_adapter(out / "adapter")  # refuses missing config, corrupt files and empty tensors
    except AdapterError as e:
        return {**row, "note": f"bad adapter: {e}"}
    result = json.loads((out / "result.json").read_text())
    return {**row, "ok": True, "step_s": result["step_s"], "peak_bytes": result["peak_bytes"],
            "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
            "note": f"{result['world_size']} process(es) on {result['device']}"}


def table(rows: list[dict]) -> str:
    head = f"{'setup':<24}{'ok':<5}{'step time':>11}{'peak memory':>14}{'adapter bytes':>15}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        step = f"{r['step_s'] * 1000:.0f} ms" if r["step_s"] is not None else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
        size = f"{r['adapter_bytes']:,}" if r["adapter_bytes"] is not None else "-"
        lines.append(f"{r['setup']:<24}{'yes' if r['ok'] else 'no':<5}{step:>11}{peak:>14}{size:>15}  {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="no GPU: tiny shapes, 2 processes over gloo")
    p.add_argument("--size", choices=list(SIZES), default=None, help="model shape (default: medium, tiny on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per setup (default 20, 6 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512, 32 on CPU)")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--budget", type=float, default=540, help="seconds; no launch starts after this")
    p.add_argument("--launch-timeout", type=int, default=240)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    n_gpus = torch.cuda.device_count()
    args.cpu = args.cpu or n_gpus == 0
    args.size = args.size or ("tiny" if args.cpu else "medium")
    args.steps = args.steps or (6 if args.cpu else 20)
    args.seq = args.seq or (32 if args.cpu else 512)
    start = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf-lowrank-gpu-check-") as tmp:
        work = Path(tmp)
        model = build_model(work / "base", args.size)
        print(f"model {args.size} {SIZES[args.size]}, {args.steps} steps x batch 4 x seq {args.seq}, "
              f"{'cpu (2 processes)' if args.cpu else f'{n_gpus} GPU(s)'}", flush=True)
        for setup in args.setups.split(","):
            if time.monotonic() - start > args.budget:
                rows.append({"setup": setup, "ok": False, "step_s": None, "peak_bytes": None, "adapter_bytes": None,
                             "note": "not run: time budget spent"})
                continue
            t0 = time.monotonic()
            rows.append(run_setup(setup, model, work, args, n_gpus))
            print(f"  {setup}: {'ok' if rows[-1]['ok'] else rows[-1]['note']} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
    print(table(rows))
    print(f"total {time.monotonic() - start:.0f}s")
    return 0 if all(r["ok"] or r["note"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
