"""`hf-lowrank train`: the Trainer with hf_lowrank, every `TrainingArguments` flag parsed by `HfArgumentParser`.

With no `--model` / `--data` it trains on the built-in default (a tiny Llama created from a config and a bundled
text corpus), offline, in about a minute on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

logger = logging.getLogger("hf_lowrank")


@dataclass
class LowRankArguments:
    """What to train on and the LoRA / quantization fields (see `hf_lowrank.LowRankConfig`)."""

    model: str | None = field(default=None, metadata={"help": "base model folder or Hub id (default: built-in tiny "
                                                               "Llama)"})
    data: str | None = field(default=None, metadata={"help": "JSON / JSONL / text file, or a `datasets` name when "
                                                             "online (default: bundled corpus)"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in JSON / datasets rows"})
    max_length: int = field(default=128, metadata={"help": "tokens per training block"})
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear', a comma-separated list of names (q_proj,v_proj) or a regex"})
    use_rslora: bool = False
    quantization: str = field(default="nf4", metadata={"help": "nf4, fp4 or none"})
    compute_dtype: str = "bfloat16"
    sample_prompt: str = field(default="The baker", metadata={"help": "prompt for the before/after sample"})
    sample_tokens: int = 24


@dataclass
class LowRankTrainingArguments(TrainingArguments):
    """`TrainingArguments` with QLoRA defaults: paged AdamW, an output folder, and a LoRA-sized learning rate."""

    output_dir: str = field(default="hf-lowrank-output", metadata={"help": "where the adapter and checkpoints go"})
    optim: str = field(default="paged_adamw_32bit", metadata={"help": "optimizer (default: bitsandbytes paged AdamW)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    logging_steps: float = field(default=5, metadata={"help": "log every N steps"})


def lowrank_config(a: LowRankArguments):
    from .config import LowRankConfig

    targets: str | list[str] = a.target_modules
    if targets != "all-linear" and "," in targets or targets.isidentifier():
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    quant = None if a.quantization.lower() in ("none", "") else a.quantization
    return LowRankConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
                         use_rslora=a.use_rslora, quantization=quant, compute_dtype=a.compute_dtype)


def load_texts(data: str | None, text_field: str) -> list[str]:
    """Rows of text from the bundled corpus, a .txt / .json / .jsonl file, or a `datasets` name."""
    from .data import corpus_text

    if data is None:
        return [line for line in corpus_text().splitlines() if line.strip()]
    path = Path(data)
    if path.is_file():
        if path.suffix in (".txt", ".text", ".md"):
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix in (".json", ".jsonl"):
            text = path.read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else json.loads(text)
            if isinstance(rows, dict):
                rows = rows.get("data") or rows.get("train") or [rows]
            try:
                return [r[text_field] if isinstance(r, dict) else str(r) for r in rows]
            except KeyError:
                raise SystemExit(f"hf-lowrank train: --data {data}: rows have no field {text_field!r}; "
                                 f"pass --text_field with one of {sorted(rows[0])}") from None
        raise SystemExit(f"hf-lowrank train: --data {data}: expected a .txt, .json or .jsonl file")
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"hf-lowrank train: --data {data} is not a file, and `datasets` is not installed to load "
                         "it by name (pip install datasets)") from None
    ds = datasets.load_dataset(data, split="train")
    return list(ds[text_field])


def block_dataset(texts: list[str], tokenizer, max_length: int):
    """Concatenate the tokenized texts and cut them into blocks of `max_length` tokens (labels = input ids)."""
    import torch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + eos
    n = max(len(ids) // max_length, 1)
    ids = (ids * math.ceil(n * max_length / max(len(ids), 1)))[: n * max_length]
    blocks = torch.tensor(ids).view(n, max_length)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    return Blocks()


def sample(model, tokenizer, prompt: str, n: int) -> str:
    import torch

    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def plot_losses(history: list[dict], path: Path) -> Path | None:
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no loss plot: pip install 'hf-lowrank[plot]' for matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("hf-lowrank train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer

    from .data import build_default_base
    from .format import WEIGHTS_NAME
    from .integrations.callback import LowRankCallback
    from .loading import from_pretrained

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((LowRankArguments, LowRankTrainingArguments))
    parser.prog = "hf-lowrank train"
    lr_args, args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)
    out = Path(args.output_dir)
    builtin = lr_args.model is None
    if builtin:
        model_path = str(build_default_base(out / "base-model"))
        print(f"no --model: using the built-in tiny Llama written to {model_path}")
        if "--learning_rate" not in argv:
            args.learning_rate = 3e-3  # a random base and a tiny corpus: a large step shows learning in a minute
        if "--max_steps" not in argv and "--num_train_epochs" not in argv:
            args.max_steps = 80
    else:
        model_path = lr_args.model
    if lr_args.data is None:
        print("no --data: using the bundled corpus")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = block_dataset(load_texts(lr_args.data, lr_args.text_field), tokenizer, lr_args.max_length)
    config = lowrank_config(lr_args)
    model = from_pretrained(AutoModelForCausalLM, model_path, config)
    before = sample(model, tokenizer, lr_args.sample_prompt, lr_args.sample_tokens)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[LowRankCallback()])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(str(out))
    after = sample(model, tokenizer, lr_args.sample_prompt, lr_args.sample_tokens)
    if not trainer.is_world_process_zero():
        return 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    size = (out / WEIGHTS_NAME).stat().st_size
    plot = plot_losses(trainer.state.log_history, out / "loss.png")
    print("\n" + "=" * 72)
    if losses:
        print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {trainer.state.global_step} steps")
    print(f"adapter: {out / WEIGHTS_NAME} ({size / 1024:.1f} KiB)")
    print(f"before: {before!r}")
    print(f"after:  {after!r}")
    if plot:
        print(f"loss plot: {plot}")
    print(f"load it: hf_lowrank.load(AutoModelForCausalLM, {os.fspath(out)!r})")
    return 0


__all__ = ["LowRankArguments", "LowRankTrainingArguments", "train_main", "dataclasses"]
