"""DPO through TRL: hf-lowrank against TRL + PEFT + bitsandbytes on the same model and data, and against our own SFT.

Both sides load the same random-init Llama-shaped checkpoint (`compare_peft.make_model`), quantize it to NF4 with
double quantization and bf16 compute, put r=16 LoRA on every linear layer but the head, and run TRL's `DPOTrainer`
with `ref_model=None` (the reference is the model with its adapters disabled on both sides: PEFT's through
`is_peft_model`, ours through `hf_lowrank.integrations.trl.ReferenceView`), torch AdamW, non-reentrant gradient
checkpointing, the same preference pairs (chosen / rejected cut from the bundled corpus, `--seq` tokens each).

    ours-dpo   hf_lowrank.from_pretrained(...) + LowRankCallback → DPOTrainer
    peft-dpo   from_pretrained(quantization_config=...) → prepare_model_for_kbit_training → get_peft_model → DPOTrainer
    ours-sft   the same model and the chosen sequences through transformers' Trainer (causal-LM loss): the memory a
               reference model must not add to

Every run is its own process (peak RSS is per process; it is reset after loading, so it is the training peak plus
the model), and runs alternate (ours-dpo, peft-dpo, ours-sft, ours-dpo, ...) so a slow patch of the machine hits
every side; the table gives medians. Step time is the median of the timed steps after `--warmup`.

    python benchmarks/dpo.py                 # 4 blocks × 512 (compare_peft's "small"), seq 128, 3 rounds
    python benchmarks/dpo.py --smoke         # tiny shapes, seconds: checks the script, measures nothing
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
import compare_peft  # noqa: E402  (the shared model builder, loaders and RSS helpers)

SIDES = ("ours-dpo", "peft-dpo", "ours-sft")
# (label, key, target, reference side)
ROWS = [("DPO train step", "step_s", 0.9, "peft-dpo"), ("DPO peak RSS", "peak_rss_mib", 0.9, "peft-dpo"),
        ("DPO peak RSS vs our SFT peak", "peak_rss_mib", 1.15, "ours-sft"),
        ("DPO training peak above the start", "train_rss_delta_mib", None, "peft-dpo"),
        ("DPO training peak above the start vs our SFT's", "train_rss_delta_mib", None, "ours-sft")]


def pairs(tokenizer, n: int, seq: int) -> list[dict]:
    """`n` preference pairs from the bundled corpus: a 16-token prompt, then two different continuations."""
    from hf_lowrank.data import corpus_text

    ids = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    span, rows = 16 + 2 * seq, []
    for i in range(n):
        start = (i * span) % max(len(ids) - span, 1)
        chunk = ids[start:start + span]
        rows.append({"prompt": tokenizer.decode(chunk[:16]), "chosen": tokenizer.decode(chunk[16:16 + seq]),
                     "rejected": tokenizer.decode(chunk[16 + seq:])})
    return rows


def worker(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    compare_peft._common_imports()
    from trl import DPOConfig, DPOTrainer  # noqa: F401  (every side: TRL's trainer modules are no side's cost)

    torch.set_num_threads(args.threads)
    if args.side.startswith("peft"):
        import peft  # noqa: F401
    import hf_lowrank

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    import_rss = compare_peft._rss_mib()
    compare_peft._reset_peak_rss()
    if args.side == "peft-dpo":
        model, _, _ = compare_peft._load_peft(args.model)
    else:
        model, _, _ = compare_peft._load_ours(args.model)
    compare_peft._release_freed_memory()
    compare_peft._reset_peak_rss()
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    rows = pairs(tokenizer, 4 * (args.warmup + args.steps), args.seq)
    callbacks = [Clock()] + ([] if args.side.startswith("peft") else [hf_lowrank.LowRankCallback(default_optim=None)])
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, per_device_train_batch_size=4,
                  learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no", optim="adamw_torch",
                  logging_steps=1, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0)
    if args.side == "ours-sft":
        enc = [tokenizer(r["prompt"] + r["chosen"], truncation=True, max_length=16 + args.seq).input_ids for r in rows]
        data = [{"input_ids": torch.tensor(e), "labels": torch.tensor(e)} for e in enc if len(e) == len(enc[0])]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=callbacks)
    else:
        config = trl.DPOConfig(max_length=16 + 2 * args.seq, bf16=False, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=callbacks)
        assert trainer.ref_model is None or not list(trainer.ref_model.parameters()), "a second model was built"
    compare_peft._release_freed_memory()
    built_rss = compare_peft._rss_mib()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = compare_peft._rss_mib("VmHWM")
    return {"side": args.side, "step_s": statistics.median(times[args.warmup:]), "peak_rss_mib": peak,
            "import_rss_mib": import_rss, "built_rss_mib": built_rss, "train_rss_delta_mib": peak - built_rss,
            "last_loss": losses[-1] if losses else float("nan")}


def run(side: str, model: str, tok: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--tokenizer", tok, "--seq", str(a.seq),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]]) -> str:
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("step_s", "peak_rss_mib", "train_rss_delta_mib")}
           for side, runs in results.items()}
    lines = ["| metric | ours | reference | ratio | target |", "|---|---|---|---|---|"]
    for label, key, target, ref in ROWS:
        ours, other = med["ours-dpo"][key], med[ref][key]
        ratio = ours / other
        unit = "s" if key == "step_s" else "MiB"
        verdict = "" if target is None else f"≤ {target} ({'met' if ratio <= target else 'MISSED'})"
        lines.append(f"| {label} ({ref}) | {ours:.3f} {unit} | {other:.3f} {unit} | {ratio:.2f} | {verdict} |")
    runs = len(next(iter(results.values())))
    lines.append(f"\n{runs} runs per side, alternating; medians. Last DPO loss: ours "
                 f"{statistics.median(r['last_loss'] for r in results['ours-dpo']):.4f}, PEFT "
                 f"{statistics.median(r['last_loss'] for r in results['peft-dpo']):.4f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=SIDES)
    p.add_argument("--model")
    p.add_argument("--tokenizer")
    p.add_argument("--size", default="small", choices=sorted(compare_peft.SIZES))
    p.add_argument("--seq", type=int, default=128, help="tokens in each of chosen / rejected")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 round, 2 steps: checks the script")
    a = p.parse_args(argv)
    if a.worker:
        a.side = a.worker
        print(json.dumps(worker(a)))
        return 0
    if a.smoke:
        a.size, a.seq, a.steps, a.warmup, a.rounds = "tiny", 16, 2, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        from hf_lowrank.data import build_tokenizer

        vocab = compare_peft.SIZES[a.size][4]
        build_tokenizer(vocab).save_pretrained(Path(tmp) / "tok")
        model = compare_peft.make_model(Path(tmp) / "model", a.size)
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        for _ in range(a.rounds):
            for side in SIDES:
                results[side].append(run(side, model, str(Path(tmp) / "tok"), a))
    print(f"DPO, Llama {a.size} {compare_peft.SIZES[a.size][:2]}, seq {a.seq} (+16 prompt), batch 4, "
          f"{a.steps} timed steps")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
