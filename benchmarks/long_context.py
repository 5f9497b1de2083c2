"""Long sequences and large vocabularies: hf-lowrank's chunked linear + cross-entropy against PEFT + bitsandbytes.

Both sides load the same random-init Llama-shaped checkpoint (4 blocks × 512, intermediate 1408, 8 heads) with a
vocabulary of 32,000 or 128,256 (untied head), quantize it to NF4 + double quant with bf16 compute, put r=16 LoRA on
every linear layer but the head (alpha 32, dropout 0.05; `--dropout`), and train with torch's fused AdamW (Trainer's
default `optim`), batch 1, non-reentrant gradient checkpointing on both sides:

    ours  hf_lowrank.from_pretrained(AutoModelForCausalLM, path, LowRankConfig(...)) + enable_fused_loss(model)
    PEFT  from_pretrained(quantization_config=BitsAndBytesConfig(NF4, DQ, bf16)) → prepare_model_for_kbit_training
          → get_peft_model(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05))

Per cell (vocabulary × sequence length):

- peak RSS: each side in its own process (load, then warm-up + measured steps); whole process, and the training
  phase above the RSS after the imports (the loader's freed memory returned to the OS first, on both sides);
- step time (forward, backward, optimizer step) and loss: both models in one process, steps taking turns with the
  floor (who goes first rotates), medians; the ratios are the medians of the per-round ratios;
- the floor: the same NF4 model as ours with every adapter disabled (``hf_lowrank.disabled_adapters``), forward and
  backward to its input embeddings (which require grad), same checkpointing, same loss path, no optimizer: what any
  QLoRA step on this model must do at least. ours/floor is printed for every cell;
- growth of the training peak per 1,000 tokens: the least-squares slope of the training-phase peak over the sequence
  lengths, per vocabulary, for each side.

Two more cells repeat the issue's floor reference (4 × 512, vocabulary 2,048, batch 4, seq 128 and 512).

    python benchmarks/long_context.py                 # the full table (about an hour on 2 CPU cores)
    python benchmarks/long_context.py --vocabs 128256 --seqs 4096 --steps 2
    python benchmarks/long_context.py --profile 512:2048:4   # where ours spends its time against the floor
    python benchmarks/long_context.py --phases 128:2048:4 --steps 8   # the same, wall time per part of the layers
    python benchmarks/long_context.py --floor-only --vocabs '' --seqs '' --steps 8   # only ours/floor, per round
    python benchmarks/long_context.py --floor-only --vocabs '' --seqs '' --products both   # + rank-r products in bf16
    python benchmarks/long_context.py --quick         # tiny shapes, seconds: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (blocks, hidden, intermediate, heads)
SHAPE = (4, 512, 1408, 8)
QUICK_SHAPE = (2, 128, 256, 4)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
TARGETS = {"rss_4096_128k": 0.5, "step": 0.9, "growth": 0.5, "floor": 1.15}
#: glibc malloc settings under which freed memory stays in the process: no trimming of the heap's top back to the OS,
#: and no fresh mmap (whose pages fault in again) for tensors under 32 MiB, the largest threshold glibc accepts (a
#: larger value is ignored and, with the trim setting, pins the threshold at 128 KiB). That is what PyTorch's caching
#: allocator does on a GPU, and jemalloc or tcmalloc (`torch.backends.xeon.run_cpu --enable-jemalloc`) on CPU.
RETAIN_FREED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


# ---- the model ----------------------------------------------------------------------------------------------------


def make_model(folder: Path, vocab: int, shape=SHAPE, max_pos: int = 4096) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks, hidden, inter, heads = shape
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def set_dropout(p: float) -> None:
    """Both sides' LoRA dropout (compare_peft's recipe; 0.05 by default)."""
    import compare_peft

    compare_peft.LORA["lora_dropout"] = p


def load_ours(path: str):
    from compare_peft import _load_ours

    from hf_lowrank.fused_lm import enable_fused_loss

    model = _load_ours(path)[0]
    return model, enable_fused_loss(model)


def load_peft(path: str):
    from compare_peft import _load_peft

    return _load_peft(path)[0]


# ---- workers ------------------------------------------------------------------------------------------------------


def _adamw(model):
    """AdamW over the trainable tensors, lr 1e-4, fused: what Trainer builds by default (`adamw_torch_fused`); the
    for-loop implementation torch picks on CPU otherwise costs 1.5 against 0.4 ms here for 56 LoRA tensors."""
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def _step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _in_activations_dtype(fn, *args):
    """`fn(*args)` with `lora_ops` told this CPU multiplies bf16 natively: the rank-r products in the activations'
    dtype, what the library does where oneDNN has bf16 (AVX-512 and newer; elsewhere it computes them in fp32)."""
    from hf_lowrank import lora_ops

    probe = lora_ops.native_half_matmul
    lora_ops.native_half_matmul = lambda dtype: True
    try:
        return fn(*args)
    finally:
        lora_ops.native_half_matmul = probe


def _floor_step(model, ids) -> float:
    import hf_lowrank

    with hf_lowrank.disabled_adapters(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
    return loss.item()


def _ids(vocab: int, batch: int, seq: int):
    import torch

    return torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def memory_worker(args) -> dict:
    """One side in its own process: peak RSS of the whole process and of the training phase above the imports."""
    import torch
    from compare_peft import _common_imports, _release_freed_memory, _reset_peak_rss, _rss_mib

    _common_imports()
    import peft  # noqa: F401

    import hf_lowrank.fused_lm  # noqa: F401

    torch.set_num_threads(args.threads)
    import_rss = _rss_mib()
    _reset_peak_rss()
    model, how = load_ours(args.model) if args.side == "ours" else (load_peft(args.model), "stock")
    load_peak = _rss_mib("VmHWM")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(model)
    ids = _ids(model.config.vocab_size, args.batch, args.seq)
    _release_freed_memory()
    _reset_peak_rss()
    losses = [_step(model, opt, ids) for _ in range(args.warmup + args.steps)]
    train_peak = _rss_mib("VmHWM")
    return {"side": args.side, "loss_path": how, "trainable": sum(p.numel() for p in params),
            "peak_rss_mib": max(load_peak, train_peak), "train_rss_delta_mib": train_peak - import_rss,
            "import_rss_mib": import_rss, "first_loss": losses[0]}


def timing_worker(args) -> dict:
    """Ours, PEFT and the floor in one process, one step each per round, who goes first rotating; medians."""
    import torch
    from compare_peft import _common_imports

    _common_imports()
    torch.set_num_threads(args.threads)
    ours, how = load_ours(args.model)
    models = {"ours": ours} if args.floor_only else {"ours": ours, "peft": load_peft(args.model)}
    for m in models.values():
        m.train()
    opts = {name: _adamw(m) for name, m in models.items()}
    ids = _ids(ours.config.vocab_size, args.batch, args.seq)
    run = {name: (lambda m=m, o=opts[name]: _step(m, o, ids)) for name, m in models.items()}
    run["floor"] = lambda: _floor_step(ours, ids)
    if args.products == "both":  # the same model, its rank-r products forced into the activations' dtype
        run["act"] = lambda: _in_activations_dtype(_step, ours, opts["ours"], ids)
    sides = list(run)
    times = {s: [] for s in sides}
    losses = {s: [] for s in sides}
    for i in range(args.warmup + args.steps):
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:
            t0 = time.perf_counter()
            losses[side].append(run[side]())
            if i >= args.warmup:
                times[side].append(time.perf_counter() - t0)
    out = {"loss_path": how}
    for side in sides:
        out[f"{side}_step_s"] = statistics.median(times[side])
        out[f"{side}_loss"] = losses[side][0]
    # ratios of the steps of one round, then their median: steadier than a ratio of medians on a shared machine
    out["ours_floor_ratio"] = statistics.median(o / f for o, f in zip(times["ours"], times["floor"], strict=True))
    if "act" in times:
        out["ours_act_ratios"] = [o / a for o, a in zip(times["ours"], times["act"], strict=True)]
        out["ours_act_ratio"] = statistics.median(out["ours_act_ratios"])
    if "peft" in times:
        out["ours_peft_ratio"] = statistics.median(o / q for o, q in zip(times["ours"], times["peft"], strict=True))
    out["ours_floor_ratios"] = [o / f for o, f in zip(times["ours"], times["floor"], strict=True)]
    return out


def _warmed_up(args):
    """Ours loaded, in training mode, with its optimizer and input ids, after one step and one floor step."""
    ours, _ = load_ours(args.model)
    ours.train()
    opt = _adamw(ours)
    ids = _ids(ours.config.vocab_size, args.batch, args.seq)
    _step(ours, opt, ids)
    _floor_step(ours, ids)
    return ours, opt, ids


def profile_worker(args) -> dict:
    """torch.profiler over ours' step and the floor's, steps alternating; self CPU time per op, summed over steps."""
    import torch
    from compare_peft import _common_imports
    from torch.profiler import ProfilerActivity, profile, record_function

    _common_imports()
    torch.set_num_threads(args.threads)
    ours, opt, ids = _warmed_up(args)
    totals = {"ours": {}, "floor": {}}
    phases = {"ours": {}, "floor": {}}
    wall = {"ours": [], "floor": []}
    for _ in range(args.steps):
        for side in ("ours", "floor"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                if side == "ours":
                    with record_function("phase: forward"):
                        loss = ours(input_ids=ids, labels=ids).loss
                    with record_function("phase: backward"):
                        loss.backward()
                    with record_function("phase: optimizer"):
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                else:
                    import hf_lowrank

                    with hf_lowrank.disabled_adapters(ours):
                        embeds = ours.get_input_embeddings()(ids).detach().requires_grad_(True)
                        with record_function("phase: forward"):
                            loss = ours(inputs_embeds=embeds, labels=ids).loss
                        with record_function("phase: backward"):
                            loss.backward()
                wall[side].append(time.perf_counter() - t0)
            for e in prof.key_averages():
                bucket = phases[side] if e.key.startswith("phase: ") else totals[side]
                value = e.cpu_time_total if e.key.startswith("phase: ") else e.self_cpu_time_total
                bucket[e.key] = bucket.get(e.key, 0.0) + value / 1e6 / args.steps
    return {"totals": totals, "phases": phases, "wall": {k: statistics.median(v) for k, v in wall.items()}}


def phases_worker(args) -> dict:
    """Wall time per step in the adapters' code against the floor's, steps alternating: the functions below wrapped
    with a timer in this worker only (summed over a step's calls, median over steps). Disjoint parts of ours' step:
    drawing the dropout positions, the zeroed copy of x, the base layers' forward, the rest of ours' node forward
    (the rank-r products, casts, saving), and its backward less the recompute that its unpacking triggers (the
    recomputed forwards are counted in the rows above); the same timers on the floor's step (adapters disabled: no
    dropout and no node should run there), and bitsandbytes' backward."""
    import collections

    import bitsandbytes as bnb
    import bitsandbytes.autograd._functions as bnb_autograd
    import torch
    from compare_peft import _common_imports

    from hf_lowrank import layers, lora_ops

    _common_imports()
    torch.set_num_threads(args.threads)
    spent = collections.Counter()

    in_node = [0]  # > 0 while ours' node forward runs: the base and zeroing calls inside it are its parts

    def timed(owner, name: str, key: str, static: bool = False, node: bool = False) -> None:
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            in_node[0] += node
            try:
                return fn(*a, **k)
            finally:
                in_node[0] -= node
                dt = time.perf_counter() - t0
                spent[key] += dt
                if in_node[0]:
                    spent[f"{key} in node"] += dt
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    timed(layers, "dropout_plan", "draw")
    timed(lora_ops, "zeroed", "zero")
    timed(layers, "_dense", "dequant")
    timed(lora_ops, "_saved", "unpack")
    timed(bnb.nn.Linear4bit, "forward", "base")
    timed(lora_ops._LoraLinear, "forward", "node_fwd", static=True, node=True)
    timed(lora_ops._LoraLinear, "backward", "node_bwd", static=True)
    timed(bnb_autograd.MatMul4Bit, "backward", "bnb_bwd", static=True)
    ours, opt, ids = _warmed_up(args)
    steps = {"ours": [], "floor": []}
    for i in range(args.steps):
        for side in ("ours", "floor") if i % 2 == 0 else ("floor", "ours"):
            spent.clear()
            t0 = time.perf_counter()
            _step(ours, opt, ids) if side == "ours" else _floor_step(ours, ids)
            steps[side].append({**spent, "step": time.perf_counter() - t0})
    for s in steps["ours"] + steps["floor"]:
        s["node_rest"] = s.get("node_fwd", 0.0) - s.get("zero in node", 0.0) - s.get("base in node", 0.0)
        s["bwd_less_recompute"] = s.get("node_bwd", 0.0) - s.get("unpack", 0.0)

    def median(side: str, keys: tuple[str, ...]) -> dict:
        return {k: statistics.median(s.get(k, 0.0) for s in steps[side]) for k in keys}
    return {"ours": median("ours", ("step", "draw", "zero", "base", "dequant", "node_rest", "bwd_less_recompute")),
            "floor": median("floor", ("step", "base", "draw", "zero", "node_rest", "bnb_bwd"))}


def phases_table(r: dict) -> str:
    o, f = r["ours"], r["floor"]
    rows = [("step (wall)", o["step"], f["step"]),
            ("base layers' forward (bitsandbytes; every call, the recompute's too)", o["base"], f["base"]),
            ("dropout: drawing the positions", o["draw"], f["draw"]),
            ("dropout: the zeroed copy of x", o["zero"], f["zero"]),
            ("ours' node forward, the rest (rank-r products, casts, saving)", o["node_rest"], f["node_rest"]),
            ("backward of the LoRA layers (ours' node less its recompute; the floor: bitsandbytes')",
             o["bwd_less_recompute"], f["bnb_bwd"]),
            ("  of which dequantizing W0 for ∂x", o["dequant"], float("nan")),
            ("everything else (attention, norms, the head and loss, autograd, the optimizer, Python)",
             o["step"] - o["base"] - o["draw"] - o["zero"] - o["node_rest"] - o["bwd_less_recompute"],
             f["step"] - f["base"] - f["draw"] - f["zero"] - f["node_rest"] - f["bnb_bwd"])]
    lines = ["| part of a step (wall, median over steps) | ours | floor | ours − floor |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        lines.append(f"| {name} | {_fmt_s(a)} | {'–' if b != b else _fmt_s(b)} | "
                     f"{'–' if b != b else _fmt_s(a - b) if abs(a - b) >= 5e-4 else '0 ms'} |")
    return "\n".join(lines)


# ---- the driver ---------------------------------------------------------------------------------------------------


def run_worker(kind: str, side: str, model: str, seq: int, batch: int, args, retain: bool | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--side", side, "--model", model, "--seq", str(seq),
           "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--dropout", str(args.dropout), "--products", args.products] + \
        (["--floor-only"] if args.floor_only else [])
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    if retain is None:
        retain = args.malloc == "retain" and kind != "memory"  # peak RSS is always measured under the system's
    if retain:
        env.update(RETAIN_FREED)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ok(value: float, target: float) -> str:
    return f"≤ {target} {'✓' if value <= target else '✗'}"


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (tokens, MiB), in MiB per 1,000 tokens."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] / 1000 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def _vocab_name(v: int) -> str:
    return f"{v:,}"


def tables(cells: list[dict], long_vocab: int) -> str:
    lines = ["| vocab | batch × seq | peak RSS ours | peak RSS PEFT | ours/PEFT | training peak above imports, ours | "
             "PEFT | ours/PEFT | step ours | step PEFT | ours/PEFT | floor step | ours/floor | loss ours | loss PEFT |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        o, p, t = c["ours"], c["peft"], c["timing"]
        rss = o["peak_rss_mib"] / p["peak_rss_mib"]
        rss_note = f" {_ok(rss, TARGETS['rss_4096_128k'])}" if c["seq"] == 4096 and c["vocab"] == long_vocab else ""
        step, floor = t["ours_peft_ratio"], t["ours_floor_ratio"]
        lines.append(
            f"| {_vocab_name(c['vocab'])} | {c['batch']} × {c['seq']} | {o['peak_rss_mib']:,.0f} MiB | "
            f"{p['peak_rss_mib']:,.0f} MiB | {rss:.2f}{rss_note} | {o['train_rss_delta_mib']:,.0f} MiB | "
            f"{p['train_rss_delta_mib']:,.0f} MiB | {o['train_rss_delta_mib'] / p['train_rss_delta_mib']:.2f} | "
            f"{_fmt_s(t['ours_step_s'])} | {_fmt_s(t['peft_step_s'])} | {step:.2f} {_ok(step, TARGETS['step'])} | "
            f"{_fmt_s(t['floor_step_s'])} | {floor:.2f} {_ok(floor, TARGETS['floor'])} | {t['ours_loss']:.4f} | "
            f"{t['peft_loss']:.4f} |")
    growth = ["| vocab | ours MiB / 1k tokens | PEFT MiB / 1k tokens | ours/PEFT |", "|---:|---:|---:|---:|"]
    for vocab in sorted({c["vocab"] for c in cells if c["batch"] == 1}):
        pts = [c for c in cells if c["vocab"] == vocab and c["batch"] == 1]
        if len(pts) < 2:
            continue
        ours = _slope([(c["seq"], c["ours"]["train_rss_delta_mib"]) for c in pts])
        peft = _slope([(c["seq"], c["peft"]["train_rss_delta_mib"]) for c in pts])
        ratio = ours / peft if peft else float("nan")
        growth.append(f"| {_vocab_name(vocab)} | {ours:,.1f} | {peft:,.1f} | {ratio:.3f} "
                      f"{_ok(ratio, TARGETS['growth'])} |")
    return "\n".join(lines) + "\n\nGrowth of the training peak per 1,000 tokens (batch 1, least-squares slope)\n\n" + \
        "\n".join(growth)


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def profile_table(result: dict, top: int = 18) -> str:
    ours, floor = result["totals"]["ours"], result["totals"]["floor"]
    keys = sorted(set(ours) | set(floor), key=lambda k: -(ours.get(k, 0) - floor.get(k, 0)))
    lines = [f"wall: ours {_fmt_s(result['wall']['ours'])}, floor {_fmt_s(result['wall']['floor'])}, "
             f"ratio {result['wall']['ours'] / result['wall']['floor']:.2f}", "",
             "| phase | ours | floor | ours − floor |", "|---|---:|---:|---:|"]
    for k in ("phase: forward", "phase: backward", "phase: optimizer"):
        o, f = result["phases"]["ours"].get(k, 0.0), result["phases"]["floor"].get(k, 0.0)
        lines.append(f"| {k[7:]} | {_fmt_s(o)} | {_fmt_s(f)} | {_fmt_s(o - f)} |")
    lines += ["", "| op (self CPU time per step) | ours | floor | ours − floor |", "|---|---:|---:|---:|"]
    for k in keys[:top]:
        o, f = ours.get(k, 0.0), floor.get(k, 0.0)
        lines.append(f"| `{k}` | {_fmt_s(o)} | {_fmt_s(f)} | {_fmt_s(o - f)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--seqs", default="512,2048,4096")
    p.add_argument("--reference", default="2048:4:128,2048:4:512",
                   help="extra cells vocab:batch:seq (the issue's floor reference); '' for none")
    p.add_argument("--steps", type=int, default=3, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 step: checks the script, measures nothing")
    p.add_argument("--profile", help="vocab-independent profile of one cell, seq:vocab:batch (e.g. 512:2048:4)")
    p.add_argument("--phases", help="wall time per part of ours' LoRA layers against the floor, seq:vocab:batch")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on both sides")
    p.add_argument("--floor-only", action="store_true",
                   help="only ours against the floor (step times, one process per cell): no PEFT, no memory")
    p.add_argument("--malloc", choices=["system", "retain"], default="system",
                   help="glibc as the process finds it, or RETAIN_FREED in the timing and profile workers' "
                        "environment (peak RSS is always measured under the system's)")
    p.add_argument("--products", choices=["auto", "both"], default="auto",
                   help="with --floor-only, 'both' adds ours with the rank-r products forced into the activations' "
                        "dtype (bf16), alternating with the library's choice (fp32 on a CPU without native bf16)")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--worker", choices=["memory", "timing", "profile", "phases"],
                   help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.products == "both" and not (args.floor_only or args.worker):
        p.error("--products both is a column of the --floor-only table: add --floor-only")

    if args.worker:
        set_dropout(args.dropout)
        worker = {"memory": memory_worker, "timing": timing_worker, "profile": profile_worker,
                  "phases": phases_worker}[args.worker]
        print(json.dumps(worker(args)))
        return 0
    shape = SHAPE
    if args.quick:
        shape, args.vocabs, args.seqs, args.reference = QUICK_SHAPE, "512", "32,64", ""
        args.steps, args.warmup = 1, 0
    blocks, hidden = shape[:2]

    if args.phases:
        seq, vocab, batch = (int(x) for x in args.phases.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            result = run_worker("phases", "ours", make_model(Path(tmp) / "m", vocab, shape), seq, batch, args)
        print(f"Phases: {blocks}×{hidden}, vocab {vocab:,}, batch {batch} × seq {seq}, LoRA dropout {args.dropout}, "
              f"{args.threads} thread(s), malloc {args.malloc}, {args.steps} step(s) per side, alternating\n")
        print(phases_table(result))
        return 0
    if args.profile:
        seq, vocab, batch = (int(x) for x in args.profile.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            path = make_model(Path(tmp) / "m", vocab, shape)
            result = run_worker("profile", "ours", path, seq, batch, args)
        print(f"Profile: {blocks}×{hidden}, vocab {vocab:,}, batch {batch} × seq {seq}, LoRA dropout {args.dropout}, "
              f"{args.threads} thread(s), malloc {args.malloc}, "
              f"median of {args.steps} step(s); self CPU time per op, ours minus the floor first\n")
        print(profile_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    vocabs = [int(v) for v in args.vocabs.split(",") if v]
    seqs = [int(s) for s in args.seqs.split(",") if s]
    plan = [(v, 1, s) for v in vocabs for s in seqs]
    plan += [tuple(int(x) for x in c.split(":")) for c in args.reference.split(",") if c]
    cells, how = [], {}
    if args.floor_only:
        print(f"Ours against the floor, Llama {blocks}×{hidden}, r=16 all-linear, dropout {args.dropout}, "
              f"{args.threads} thread(s), malloc {args.malloc}, {args.steps} round(s) after {args.warmup} warm-up\n\n"
              "| vocab | batch × seq | step ours | floor step | ours/floor (median) | per round | loss ours |"
              + (" ours, bf16 products | ours/that | per round |" if args.products == "both" else "") + "\n"
              "|---:|---|---:|---:|---:|---|---:|" + ("---:|---:|---|" if args.products == "both" else ""),
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for vocab, batch, seq in plan:
            if vocab not in paths:
                paths[vocab] = make_model(Path(tmp) / f"v{vocab}", vocab, shape, max([4096, *seqs]))
            t0 = time.perf_counter()
            if args.floor_only:
                t = run_worker("timing", "both", paths[vocab], seq, batch, args)
                cells.append({"vocab": vocab, "batch": batch, "seq": seq, "malloc": args.malloc, "timing": t})
                print(f"| {_vocab_name(vocab)} | {batch} × {seq} | {_fmt_s(t['ours_step_s'])} | "
                      f"{_fmt_s(t['floor_step_s'])} | {t['ours_floor_ratio']:.2f} "
                      f"{_ok(t['ours_floor_ratio'], TARGETS['floor'])} | "
                      + " ".join(f"{r:.2f}" for r in t["ours_floor_ratios"]) + f" | {t['ours_loss']:.4f} |"
                      + (f" {_fmt_s(t['act_step_s'])} | {t['ours_act_ratio']:.2f} | "
                         + " ".join(f"{r:.2f}" for r in t["ours_act_ratios"]) + " |" if "ours_act_ratio" in t else ""),
                      flush=True)
                continue
            ours = run_worker("memory", "ours", paths[vocab], seq, batch, args)
            peft = run_worker("memory", "peft", paths[vocab], seq, batch, args)
            timing = run_worker("timing", "both", paths[vocab], seq, batch, args)
            if ours["trainable"] != peft["trainable"]:
                raise AssertionError(f"trainable counts differ: ours {ours['trainable']:,}, PEFT {peft['trainable']:,}")
            how[vocab] = timing["loss_path"]
            cells.append({"vocab": vocab, "batch": batch, "seq": seq, "ours": ours, "peft": peft, "timing": timing})
            print(f"# vocab {vocab} batch {batch} seq {seq}: {time.perf_counter() - t0:.0f} s; ours "
                  f"{timing['ours_step_s']:.2f} s, PEFT {timing['peft_step_s']:.2f} s, floor "
                  f"{timing['floor_step_s']:.2f} s; peak RSS {ours['peak_rss_mib']:.0f} / {peft['peak_rss_mib']:.0f} "
                  "MiB", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=2))
    if args.floor_only:
        return 0
    long_vocab = max(vocabs) if vocabs else 0
    print(f"QLoRA (NF4 + double quant, bf16 compute), Llama {blocks}×{hidden}, r=16 all-linear, dropout "
          f"{args.dropout}, fused AdamW, non-reentrant gradient checkpointing on both sides, {args.threads} thread(s), "
          f"median of {args.steps} step(s) after {args.warmup} warm-up. Ours' loss path: "
          + "; ".join(f"vocab {v:,}: {d}" for v, d in how.items()) + "\n")
    print(tables(cells, long_vocab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
