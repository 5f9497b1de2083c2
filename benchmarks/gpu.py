"""hf-lowrank against PEFT + bitsandbytes on a GPU: throughput, peak memory, the memory floor, dequantization speed.

Random-init Llama shapes (nothing from the Hub): each is built on the device in bf16, saved to a temporary folder
and loaded back through `from_pretrained` by both sides, quantized to NF4 with double quantization and bf16 compute,
with r=16 LoRA on every linear layer but the head (alpha 32, dropout 0.05), torch AdamW and non-reentrant gradient
checkpointing on both sides. Each side of each model runs in its own process (ours first, then PEFT) and loops over
the batch sizes, resetting the peak-memory counter before each.

For every (model, batch) the table prints tokens/s and peak memory for both sides, and the analytic floor beside
them:

    floor = NF4+DQ weights (4.127 bits/param)  +  16-bit embeddings, head and norms
          + LoRA params, grads and AdamW state (4 + 4 + 8 bytes/param, fp32)
          + checkpointed activations (one bf16 hidden state per block: blocks × batch × seq × hidden × 2 bytes)

(the logits, batch × seq × vocab in bf16 plus the fp32 copy the loss makes, are printed as a separate column: at a
128k vocabulary they are often the largest single term). A dequantization microbenchmark times
`bitsandbytes.functional.dequantize_4bit` (NF4 + DQ → bf16) on the model's largest weight and reports GB/s moved
(packed codes and constants read, bf16 written) against the device's copy bandwidth, measured, and its data-sheet
figure where known.

    python benchmarks/gpu.py                       # CUDA: Llama 1B and 8B shapes, seq 2048, batch 1, 2, 4
    python benchmarks/gpu.py --sizes 1b --batches 1,4 --steps 5
    python benchmarks/gpu.py --cpu-tiny            # tiny shapes on CPU (the default without CUDA): checks the script

On one H200 the default run should take 5–10 minutes (mostly writing and quantizing the 8B checkpoint; not yet timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Llama shapes: blocks, hidden, intermediate, heads, kv heads, vocab, tied embeddings.
SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),   # Llama 3.2 1B
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama 3.1 8B
}
NF4_DQ_BITS = 4.127  # 4-bit codes + 8-bit absmax per 64 values + fp32 constant per 256 absmax blocks
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 param, fp32 grad, AdamW exp_avg + exp_avg_sq
#: data-sheet memory bandwidth (bytes/s), matched against the device name
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                  "A100 80GB PCIe": 1.94e12, "A100": 1.56e12, "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12}


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[size], max_position_embeddings=8192, rope_theta=500000.0, pad_token_id=0)


# ---- the analytic floor --------------------------------------------------------------------------------------------


def floor_bytes(size: str, batch: int, seq: int, r: int = 16) -> dict[str, float]:
    """The memory a QLoRA step cannot do without, term by term (bytes)."""
    s = SHAPES[size]
    h, inter, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out): q k v o gate up down
    quantized = L * sum(i * o for i, o in linears)
    embeddings = v * h * (1 if s["tie_word_embeddings"] else 2)
    norms = (2 * L + 1) * h
    lora = L * sum(r * (i + o) for i, o in linears)
    terms = {
        "weights": quantized * NF4_DQ_BITS / 8,
        "embeddings": 2 * (embeddings + norms),
        "lora": lora * LORA_BYTES_PER_PARAM,
        "activations": L * batch * seq * h * 2,
    }
    terms["floor"] = sum(terms.values())
    terms["logits"] = batch * seq * v * (2 + 4)
    terms["lora_params"] = lora
    return terms


# ---- worker: one side, one model, every batch size -----------------------------------------------------------------


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        from compare_peft import _reset_peak_rss

        _reset_peak_rss()


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    from compare_peft import _rss_mib

    return int(_rss_mib("VmHWM") * 2**20)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> dict:
    import torch
    from compare_peft import _common_imports, _load_ours, _load_peft

    _common_imports()
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if device == "cuda":
        base_bytes = torch.cuda.memory_allocated()
    else:  # on CPU the peak is RSS above what the interpreter and the libraries hold after the imports
        from compare_peft import _rss_mib

        base_bytes = int(_rss_mib() * 2**20)
    if args.side == "ours":
        model, load_s, inject_s = _load_ours(args.model)
    else:
        model, load_s, inject_s = _load_peft(args.model, {"": 0} if device == "cuda" else {"": "cpu"})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    dev = next(p.device for p in params)
    results = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, model.config.vocab_size, (batch, args.seq), generator=g).to(dev)
        _peak_reset(device)
        try:
            times, losses = [], []
            for _ in range(args.warmup + args.steps):
                _sync(device)
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
            step = statistics.median(times[args.warmup:])
            results.append({"batch": batch, "step_s": step, "tokens_s": batch * args.seq / step,
                            "peak_bytes": _peak_bytes(device) - base_bytes, "loss": losses[-1]})
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            results.append({"batch": batch, "oom": True})
        del ids
    return {"side": args.side, "load_s": load_s, "inject_s": inject_s, "trainable": trainable,
            "results": results}


# ---- dequantization microbenchmark ---------------------------------------------------------------------------------


def dequant_bench(size: str, device: str, iters: int = 50) -> dict:
    """GB/s of NF4+DQ → bf16 dequantization on the model's largest weight, against the device's copy bandwidth."""
    import bitsandbytes.functional as bnbf
    import torch

    s = SHAPES[size]
    shape = (s["intermediate_size"], s["hidden_size"])
    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = torch.empty_like(w)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / iters

    if device == "cuda":
        dq = timed(lambda: bnbf.dequantize_4bit(packed, state, out=out))
    else:  # bitsandbytes has no out= variant on CPU
        dq = timed(lambda: bnbf.dequantize_4bit(packed, state))
    moved = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size() \
        + state.state2.absmax.numel() * 4 + out.numel() * out.element_size()
    big = torch.empty(256 * 2**20 if device == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    copy = timed(lambda: dst.copy_(big))
    spec = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        spec = next((bw for key, bw in SPEC_BANDWIDTH.items() if key in name), None)
    return {"shape": list(shape), "dequant_s": dq, "bytes": moved, "gbs": moved / dq / 1e9,
            "copy_gbs": 2 * big.numel() / copy / 1e9, "spec_gbs": spec / 1e9 if spec else None}


# ---- the driver ----------------------------------------------------------------------------------------------------


def make_model(folder: Path, size: str, device: str) -> str:
    """Random-init weights, built on the device in bf16 and saved as a checkpoint (on CUDA in a child process, so the
    driver never holds device memory)."""
    if device == "cpu":
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM._from_config(llama_config(size), dtype=torch.bfloat16).save_pretrained(folder)
        return str(folder)
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from gpu import llama_config\n"
        "from transformers import LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        f"with torch.device({device!r}):\n"
        f"    model = LlamaForCausalLM._from_config(llama_config({size!r}), dtype=torch.bfloat16)\n"
        f"model.save_pretrained({str(folder)!r}, max_shard_size='5GB')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return str(folder)


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")


def run_side(side: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--seq", str(args.seq),
           "--batches", ",".join(map(str, args.batches)), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def throughput_table(rows: list[tuple[str, int, dict, dict, dict]], peak_name: str) -> str:
    lines = [f"| model | batch | ours tok/s | PEFT tok/s | ours/PEFT step time | ours {peak_name} | PEFT {peak_name} | "
             "ours/PEFT memory | floor | ours/floor | PEFT/floor | logits (not in floor) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, batch, ours, peft, fl in rows:
        def cell(r, key, fmt):
            return "OOM" if r.get("oom") else fmt(r[key])

        both = not ours.get("oom") and not peft.get("oom")
        t_ratio = f"{ours['step_s'] / peft['step_s']:.2f}" if both else "–"
        m_ratio = f"{ours['peak_bytes'] / peft['peak_bytes']:.2f}" if both else "–"
        of = "–" if ours.get("oom") else f"{ours['peak_bytes'] / fl['floor']:.2f}"
        pf = "–" if peft.get("oom") else f"{peft['peak_bytes'] / fl['floor']:.2f}"
        tok = lambda v: f"{v:,.0f}"  # noqa: E731
        lines.append(f"| {model} | {batch} | {cell(ours, 'tokens_s', tok)} | {cell(peft, 'tokens_s', tok)} | "
                     f"{t_ratio} | {cell(ours, 'peak_bytes', _gib)} | {cell(peft, 'peak_bytes', _gib)} | {m_ratio} | "
                     f"{_gib(fl['floor'])} | {of} | {pf} | {_gib(fl['logits'])} |")
    return "\n".join(lines)


def floor_table(sizes: list[str], batches: list[int], seq: int) -> str:
    lines = ["| model | batch | NF4+DQ weights | 16-bit embeddings/norms | LoRA params+grads+AdamW | checkpointed "
             "activations | floor |", "|---|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        for b in batches:
            f = floor_bytes(size, b, seq)
            lines.append(f"| {size} | {b} | {_gib(f['weights'])} | {_gib(f['embeddings'])} | {_gib(f['lora'])} | "
                         f"{_gib(f['activations'])} | {_gib(f['floor'])} |")
    return "\n".join(lines)


def dequant_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | weight (out × in) | dequantize NF4+DQ → bf16 | GB/s | device copy GB/s (measured) | "
             "data-sheet GB/s | share of measured | share of data sheet |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, d in rows:
        spec = f"{d['spec_gbs']:,.0f}" if d["spec_gbs"] else "–"
        share_spec = f"{d['gbs'] / d['spec_gbs']:.0%}" if d["spec_gbs"] else "–"
        lines.append(f"| {size} | {d['shape'][0]} × {d['shape'][1]} | {d['dequant_s'] * 1e6:,.0f} µs | "
                     f"{d['gbs']:,.1f} | {d['copy_gbs']:,.1f} | {spec} | {d['gbs'] / d['copy_gbs']:.0%} | "
                     f"{share_spec} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: 1b,8b on CUDA)")
    p.add_argument("--batches", default=None, help="comma list (default: 1,2,4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 2048; 64 with --cpu-tiny)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--cpu-tiny", action="store_true", help="tiny shapes on CPU (the default when CUDA is absent)")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--long-context", action="store_true",
                   help="instead: the long-context cells (vocab 32,000 / 128,256 × seq 512 / 2,048 / 4,096, batch 1, "
                        "ours with the chunked loss against PEFT and the floor; see long_context_main)")
    p.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--lc-worker", choices=["ours", "peft", "timing"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--seqs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.lc_worker:
        print(json.dumps(lc_worker(args)))
        return 0
    if args.long_context:
        return long_context_main(args)
    if args.worker:
        args.side = args.worker
        args.batches = [int(b) for b in args.batches.split(",")]
        print(json.dumps(worker(args)))
        return 0

    import torch

    tiny = args.cpu_tiny or not torch.cuda.is_available()
    if tiny and not args.cpu_tiny:
        print("# no CUDA device: running --cpu-tiny", file=sys.stderr)
    args.device = "cpu" if tiny else "cuda"
    sizes = (args.sizes or ("tiny" if tiny else "1b,8b")).split(",")
    for s in sizes:
        if s not in SHAPES:
            p.error(f"--sizes: unknown size {s!r}; choose from {', '.join(SHAPES)}")
    args.batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,2,4")).split(",")]
    args.seq = args.seq or (64 if tiny else 2048)
    if tiny:
        args.steps = min(args.steps, 2)

    rows, dq_rows, raw, failed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            try:
                sides = compare_size(size, Path(tmp) / size, args)
            except (RuntimeError, subprocess.CalledProcessError) as e:  # report the other sizes all the same
                print(f"# {size} failed: {e}", file=sys.stderr, flush=True)
                failed.append(size)
                continue
            for o, q in zip(sides["ours"]["results"], sides["peft"]["results"], strict=True):
                rows.append((size, o["batch"], o, q, floor_bytes(size, o["batch"], args.seq)))
            raw.append({"size": size, **sides})
    for size in sizes:  # after the training runs, so that this process held no device memory while they ran
        dq_rows.append((size, dequant_bench(size, args.device)))
    where = "CPU, tiny shapes: a check of the script, not a measurement" if tiny else torch.cuda.get_device_name()
    peak_name = "peak RSS above imports" if tiny else "peak allocated"
    print(f"QLoRA on {where}: NF4 + double quant, bf16 compute, r=16 all-linear, seq {args.seq}, AdamW, "
          f"non-reentrant gradient checkpointing, median of {args.steps} step(s)\n")
    print(throughput_table(rows, peak_name))
    print("\nThe floor, term by term\n")
    print(floor_table(sizes, args.batches, args.seq))
    print("\nDequantization\n")
    print(dequant_table(dq_rows))
    print("\ntrainable params: " + ", ".join(f"{r['size']} {r['ours']['trainable']:,} (both sides)" for r in raw))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see stderr)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": raw, "dequant": dict(dq_rows)}, indent=2))
    return 1 if failed else 0


def compare_size(size: str, folder: Path, args) -> dict:
    """Write the checkpoint, run ours then PEFT on it (one process each), check both train the same parameters."""
    t0 = time.perf_counter()
    path = make_model(folder, size, args.device)
    print(f"# {size}: checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    sides = {}
    try:
        for side in ("ours", "peft"):
            t0 = time.perf_counter()
            sides[side] = run_side(side, path, args)
            print(f"# {size} {side}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil_rmtree(path)
    if sides["ours"]["trainable"] != sides["peft"]["trainable"]:
        raise AssertionError(f"trainable counts differ on {size}: ours {sides['ours']['trainable']:,} vs "
                             f"PEFT {sides['peft']['trainable']:,}")
    lora = floor_bytes(size, 1, args.seq)["lora_params"]
    if lora != sides["ours"]["trainable"]:
        raise AssertionError(f"the floor counts {lora:,} LoRA params on {size}; the model has "
                             f"{sides['ours']['trainable']:,}")
    return sides


def shutil_rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ==== long context: the chunked linear + cross-entropy (issue #17), the same cells as benchmarks/long_context.py ====
#
#     python benchmarks/gpu.py --long-context                  # Llama 3.2 1B shape, vocab 32,000 and 128,256
#     python benchmarks/gpu.py --long-context --cpu-tiny       # tiny shapes on CPU: checks the code path
#
# Per vocabulary a checkpoint of the 1B shape (untied head) with that vocabulary; per side one process that loops
# over the sequence lengths (batch 1), resetting the peak-memory counter before each: peak allocated above the
# memory held before the steps, and in total. Step times come from a third process holding ours and PEFT, steps
# taking turns with the floor (ours with every adapter disabled, forward + backward to the input embeddings).

LC_VOCABS = (32000, 128256)
LC_SEQS = (512, 2048, 4096)


def lc_shape(size: str, vocab: int) -> dict:
    return {**SHAPES[size], "vocab_size": vocab, "tie_word_embeddings": False}


def lc_make_model(folder: Path, size: str, vocab: int, device: str) -> str:
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from gpu import lc_shape\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        f"cfg = LlamaConfig(**lc_shape({size!r}, {vocab}), max_position_embeddings=8192, pad_token_id=0)\n"
        f"with torch.device({device!r}):\n"
        "    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)\n"
        f"model.save_pretrained({str(folder)!r}, max_shard_size='5GB')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return str(folder)


def _lc_load(side: str, path: str, device: str):
    from long_context import load_ours

    if side == "ours":
        return load_ours(path)
    from compare_peft import _load_peft

    return _load_peft(path, {"": 0} if device == "cuda" else {"": "cpu"})[0], "stock"


def lc_worker(args) -> dict:
    import torch
    from compare_peft import _common_imports
    from long_context import _floor_step, _ids, _step

    _common_imports()
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    seqs = [int(s) for s in args.seqs.split(",")]
    sides = ["ours", "peft"] if args.lc_worker == "timing" else [args.lc_worker]
    models, how = {}, None
    for side in sides:
        model, path_name = _lc_load(side, args.model, device)
        how = path_name if side == "ours" else how
        model.train()
        models[side] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    dev = next(p.device for p in models[sides[0]][0].parameters() if p.requires_grad)
    results = []
    for seq in seqs:
        ids = _ids(models[sides[0]][0].config.vocab_size, 1, seq).to(dev)
        row = {"seq": seq}
        try:
            if args.lc_worker == "timing":
                run = {"ours": lambda x=ids: _step(*models["ours"], x),
                       "peft": lambda x=ids: _step(*models["peft"], x),
                       "floor": lambda x=ids: _floor_step(models["ours"][0], x)}
                names = list(run)
                times = {n: [] for n in names}
                for i in range(args.warmup + args.steps):
                    for n in names[i % 3:] + names[:i % 3]:
                        _sync(device)
                        t0 = time.perf_counter()
                        row[f"{n}_loss"] = run[n]()
                        _sync(device)
                        if i >= args.warmup:
                            times[n].append(time.perf_counter() - t0)
                row.update({f"{n}_step_s": statistics.median(times[n]) for n in names})
            else:
                model, opt = models[sides[0]]
                _sync(device)
                before = torch.cuda.memory_allocated() if device == "cuda" else _peak_bytes(device)
                _peak_reset(device)
                losses = [_step(model, opt, ids) for _ in range(args.warmup + args.steps)]
                peak = _peak_bytes(device)
                row.update({"peak_bytes": peak, "step_peak_bytes": peak - before, "loss": losses[0]})
        except torch.OutOfMemoryError:
            for model, opt in models.values():
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
            row["oom"] = True
        results.append(row)
    return {"side": args.lc_worker, "loss_path": how, "results": results}


def _lc_run(kind: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--lc-worker", kind, "--model", model, "--seqs", ",".join(map(str, args.seqs)),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--threads",
           str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lc_table(rows: list[tuple[int, dict, dict, dict]], peak_name: str) -> str:
    from long_context import TARGETS, _ok, _slope

    lines = [f"| vocab | seq | ours {peak_name} | PEFT {peak_name} | ours/PEFT | ours step working set | PEFT | "
             "ours/PEFT | step ours | step PEFT | ours/PEFT | floor | ours/floor | loss ours | loss PEFT |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    growth = ["| vocab | ours MiB / 1k tokens | PEFT MiB / 1k tokens | ours/PEFT |", "|---:|---:|---:|---:|"]
    for vocab, ours, peft, timing in rows:
        for o, q, t in zip(ours["results"], peft["results"], timing["results"], strict=True):
            if o.get("oom") or q.get("oom") or t.get("oom"):
                lines.append(f"| {vocab:,} | {o['seq']} | {'OOM' if o.get('oom') else _gib(o['peak_bytes'])} | "
                             f"{'OOM' if q.get('oom') else _gib(q['peak_bytes'])} | – | – | – | – | – | – | – | – | – "
                             "| – | – |")
                continue
            mem = o["peak_bytes"] / q["peak_bytes"]
            step = t["ours_step_s"] / t["peft_step_s"]
            floor = t["ours_step_s"] / t["floor_step_s"]
            lines.append(f"| {vocab:,} | {o['seq']} | {_gib(o['peak_bytes'])} | {_gib(q['peak_bytes'])} | {mem:.2f} | "
                         f"{_gib(o['step_peak_bytes'])} | {_gib(q['step_peak_bytes'])} | "
                         f"{o['step_peak_bytes'] / q['step_peak_bytes']:.2f} | {t['ours_step_s'] * 1000:.0f} ms | "
                         f"{t['peft_step_s'] * 1000:.0f} ms | {step:.2f} {_ok(step, TARGETS['step'])} | "
                         f"{t['floor_step_s'] * 1000:.0f} ms | {floor:.2f} {_ok(floor, TARGETS['floor'])} | "
                         f"{t['ours_loss']:.4f} | {t['peft_loss']:.4f} |")
        ok = [(o, q) for o, q in zip(ours["results"], peft["results"], strict=True)
              if not o.get("oom") and not q.get("oom")]
        if len(ok) >= 2:
            so = _slope([(o["seq"], o["step_peak_bytes"] / 2**20) for o, _ in ok])
            sq = _slope([(q["seq"], q["step_peak_bytes"] / 2**20) for _, q in ok])
            growth.append(f"| {vocab:,} | {so:,.1f} | {sq:,.1f} | {so / sq:.3f} {_ok(so / sq, TARGETS['growth'])} |")
    return "\n".join(lines) + "\n\nGrowth of the step's peak per 1,000 tokens (least-squares slope)\n\n" + \
        "\n".join(growth)


def long_context_main(args) -> int:
    import torch

    tiny = args.cpu_tiny or not torch.cuda.is_available()
    args.device = "cpu" if tiny else "cuda"
    size = (args.sizes or ("tiny" if tiny else "1b")).split(",")[0]
    vocabs = (512,) if tiny else LC_VOCABS
    args.seqs = [32, 64] if tiny else list(LC_SEQS)
    if tiny:
        args.steps, args.warmup = 1, 0
    rows, how = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            t0 = time.perf_counter()
            path = lc_make_model(Path(tmp) / f"v{vocab}", size, vocab, "cpu" if tiny else "cuda")
            try:
                ours, peft = _lc_run("ours", path, args), _lc_run("peft", path, args)
                timing = _lc_run("timing", path, args)
            finally:
                shutil_rmtree(path)
            how = ours["loss_path"]
            rows.append((vocab, ours, peft, timing))
            print(f"# vocab {vocab}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    where = "CPU, tiny shapes: a check of the script, not a measurement" if tiny else torch.cuda.get_device_name()
    peak_name = "peak RSS" if tiny else "peak allocated"
    print(f"Long context on {where}: Llama {size} shape (untied head), batch 1, NF4 + double quant, bf16 compute, "
          f"r=16 all-linear, AdamW, non-reentrant checkpointing both sides, median of {args.steps} step(s); ours' "
          f"loss path: {how}\n")
    print(lc_table(rows, peak_name))
    if args.json:
        Path(args.json).write_text(json.dumps([{"vocab": v, "ours": o, "peft": q, "timing": t}
                                               for v, o, q, t in rows], indent=2))
    return 0
# ==== end of the long-context section ================================================================================


if __name__ == "__main__":
    sys.exit(main())
