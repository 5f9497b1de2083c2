"""One optimizer step over a model's LoRA tensors: bitsandbytes' AdamW (what the Trainer gets by default) against
torch's AdamW (for-loop, foreach, fused), same tensors, same gradients, steps alternating in one process.

Many small tensors (A: r×in and B: out×r for every adapted layer) make the per-tensor overhead of an optimizer
visible: bitsandbytes steps tensor by tensor, torch's fused AdamW handles them all in one call.

    python benchmarks/optimizer_step.py                 # the LoRA tensors of the 12 × 1024 Llama of compare_peft.py
    python benchmarks/optimizer_step.py --blocks 2 --hidden 128 --intermediate 256 --steps 3    # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def lora_shapes(blocks: int, hidden: int, intermediate: int, r: int) -> list[tuple[int, int]]:
    """A and B of q, k, v, o (hidden → hidden), gate, up (hidden → intermediate) and down, for every block."""
    per_block = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    return [s for _ in range(blocks) for i, o in per_block for s in ((r, i), (o, r))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2752)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="measured steps per optimizer (after 2 warm-up steps)")
    args = p.parse_args(argv)

    import bitsandbytes as bnb
    import torch

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = lora_shapes(args.blocks, args.hidden, args.intermediate, args.r)
    makers = {
        "bitsandbytes PagedAdamW32bit (Trainer default)": lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-4),
        "torch AdamW, for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "torch AdamW, foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch AdamW, fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    optimizers, params_of = {}, {}
    for name, make in makers.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.01).to(device)) for s in shapes]
        for q in params:
            q.grad = torch.randn(q.shape, generator=g).mul_(1e-3).to(device)
        optimizers[name] = make(params)
        params_of[name] = params
    times = {name: [] for name in optimizers}
    for i in range(args.steps + 2):
        for name, opt in optimizers.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(times))])
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} LoRA tensors, {n:,} parameters, {device}, median of {args.steps} steps\n")
    # the same work on every side: same tensors, same gradients, same number of steps → the same parameters
    reference = params_of["torch AdamW, for-loop"]
    print("| optimizer | step | vs bitsandbytes | max abs difference of the parameters from torch's for-loop |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        diff = max((a - b).abs().max().item() for a, b in zip(params_of[name], reference, strict=True))
        print(f"| {name} | {m * 1e3:.2f} ms | {m / base:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
