"""Issue 16's measured effects: DoRA's step-time and memory cost against plain LoRA (NF4 base), and the adapter file
size of trainable new-token rows against the whole embedding as modules_to_save.

    python benchmarks/quality.py            # CPU (or the GPU when there is one), tiny Llama, ~1 minute

Step times are medians over alternating runs (LoRA, DoRA, LoRA, ...), so a busy machine slows both alike. Peak memory
is torch.cuda.max_memory_allocated on a GPU; on a CPU the script reports the extra parameters only.
"""

from __future__ import annotations

import statistics
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


def step_cost(path: str, device: str, rounds: int = 5, steps: int = 4) -> dict[str, tuple[float, float]]:
    models = {}
    for name, dora in (("LoRA", False), ("DoRA", True)):
        cfg = hf_lowrank.LowRankConfig(r=16, lora_alpha=32, use_dora=dora, lora_dropout=0.0,
                                       compute_dtype="bfloat16" if device == "cuda" else "float32")
        models[name] = hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg, device_map={"": device}).train()
    x = torch.randint(0, VOCAB, (4, 128), device=device)
    times: dict[str, list[float]] = {n: [] for n in models}
    peak: dict[str, float] = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                model(x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**20)
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: (statistics.median(t) * 1e3, peak[n]) for n, t in times.items()}


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
    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cost = step_cost(base(tmp / "base"), device)
        print(f"DoRA vs LoRA, NF4 tiny Llama (hidden {HIDDEN}, 2 layers, batch 4 x 128, r=16, all-linear), {device}")
        print("| adapter | step time (median) | peak memory |")
        print("|---|---|---|")
        for name, (ms, mib) in cost.items():
            print(f"| {name} | {ms:.1f} ms ({ms / cost['LoRA'][0]:.2f}x) | "
                  + (f"{mib:.0f} MiB |" if device == "cuda" else "n/a on CPU |"))
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
