"""`hf-lowrank train`: the Trainer with hf_lowrank, every `TrainingArguments` flag parsed by `HfArgumentParser`.

With no `--model` / `--data` it trains on the built-in default (a tiny Llama created from a config and a bundled
text corpus), offline, on a laptop CPU. The built-in run's own defaults (`BUILTIN_DEFAULTS`) are parser defaults,
so `--help` shows them and whatever the user passes, in any spelling argparse accepts, wins.

Every check that can fail fast does, before anything is loaded: the LoRA fields, `--model` (a folder, or a Hub id
that the cache or the Hub has), `--data` (the file exists and has text), `--target_modules` (on an empty "meta"
copy of the model). Mistakes raise `UsageError`, which `hf-lowrank` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from .commandline import ArgumentParser, UsageError, one_line
from .texts import block_dataset, load_texts

logger = logging.getLogger("hf_lowrank")

#: Without --model: a random base and a tiny corpus, so a large step shows learning in a minute on a CPU.
BUILTIN_DEFAULTS = {"learning_rate": 3e-3, "max_steps": 80}
#: --data values taken for files (never for a `datasets` name) by their ending.


@dataclass
class LowRankArguments:
    """What to train on and the LoRA / quantization fields (see `hf_lowrank.LowRankConfig`)."""

    _argument_group_name = "hf-lowrank options"

    model: str | None = field(default=None, metadata={
        "help": "base model: a local folder or a Hub id (default: a built-in tiny Llama, written to "
                "OUTPUT_DIR/base-model, which also changes the defaults of --learning_rate and --max_steps)"})
    data: str | None = field(default=None, metadata={
        "help": "training text: a .txt file (one text a line), a .json / .jsonl file (rows with --text_field), or a "
                "`datasets` name (default: the bundled corpus)"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in JSON / datasets rows"})
    max_length: int = field(default=128, metadata={"help": "tokens per training block"})
    r: int = field(default=16, metadata={"help": "LoRA rank: A is r×in, B is out×r"})
    lora_alpha: float = field(default=32, metadata={
        "help": "LoRA scaling: the update B·A is multiplied by lora_alpha / r (lora_alpha / √r with --use_rslora)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input, in [0, 1)"})
    target_modules: str = field(default="all-linear", metadata={
        "help": "layers that get LoRA: 'all-linear' (every linear layer but the output head), a comma-separated "
                "list of names (q_proj,v_proj) or a regex"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized LoRA: scale by lora_alpha / √r"})
    quantization: str = field(default="nf4", metadata={
        "help": "how the frozen base is stored: 4-bit NormalFloat, 4-bit float, or none (16-bit, plain LoRA)",
        "choices": ["nf4", "fp4", "none"]})
    compute_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype the 4-bit weights are dequantized to for each matmul", "choices":
            ["bfloat16", "float16", "float32"]})
    sample_prompt: str = field(default="The baker", metadata={"help": "prompt for the before/after sample"})
    sample_tokens: int = field(default=24, metadata={"help": "tokens generated for each sample (0: no sample)"})


@dataclass
class LowRankTrainingArguments(TrainingArguments):
    """`TrainingArguments` with QLoRA defaults: paged AdamW, an output folder, and a LoRA-sized learning rate."""

    _argument_group_name = "TrainingArguments (the Hugging Face Trainer's flags)"

    output_dir: str = field(default="hf-lowrank-output", metadata={"help": "where the adapter and checkpoints go"})
    optim: str = field(default="paged_adamw_32bit", metadata={"help": "optimizer (default: bitsandbytes paged AdamW)"})
    learning_rate: float = field(default=2e-4, metadata={
        "help": f"peak learning rate (2e-4 with --model; {BUILTIN_DEFAULTS['learning_rate']:g} on the built-in "
                "tiny model)"})
    max_steps: int = field(default=-1, metadata={
        "help": f"total optimizer steps; -1: --num_train_epochs decides (-1 with --model; "
                f"{BUILTIN_DEFAULTS['max_steps']} on the built-in tiny model unless --num_train_epochs is given)"})
    logging_steps: float = field(default=5, metadata={"help": "log the loss every N steps (and at the last step)"})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless the default is None or the help text already says what happens by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default:" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(HfArgumentParser):
    error = ArgumentParser.error  # one line, exit code 2, the closest flag for a misspelled one


def build_parser(builtin: bool, accelerator: bool | None = None) -> HfArgumentParser:
    """The `hf-lowrank train` parser, with the built-in run's defaults when `builtin` (no --model)."""
    parser = _Parser((LowRankArguments, LowRankTrainingArguments), prog="hf-lowrank train",
                     formatter_class=_HelpFormatter,
                     usage="hf-lowrank train [--model MODEL] [--data DATA] [hf-lowrank options] "
                           "[TrainingArguments options]",
                     description="Train a LoRA adapter on a 4-bit (QLoRA) base with the Hugging Face Trainer. Without "
                                 "--model: a built-in tiny Llama and a bundled corpus, offline, on a CPU.")
    if builtin:
        parser.set_defaults(**BUILTIN_DEFAULTS)
    if accelerator is None:
        import torch

        accelerator = torch.accelerator.is_available()
    if not accelerator:  # pinned memory needs a GPU; on CPU torch warns on every DataLoader instead
        parser.set_defaults(dataloader_pin_memory=False)
    return parser


def given_options(argv: list[str]) -> set[str]:
    """The dests of the options on the command line, however spelled (`--max-steps`, `--max_step=3`, ...)."""
    probe = _Parser((LowRankArguments, LowRankTrainingArguments), prog="hf-lowrank train", add_help=False)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = argparse.ArgumentParser.parse_known_args(probe, argv)
    return set(vars(namespace))


def parse(argv: list[str]) -> tuple[LowRankArguments, LowRankTrainingArguments]:
    given = given_options(argv)
    builtin = "model" not in given
    parser = build_parser(builtin)
    if builtin and "num_train_epochs" in given and "max_steps" not in given:
        parser.set_defaults(max_steps=-1)  # the user asked for epochs
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    lr_args = LowRankArguments(**{f.name: values[f.name] for f in dataclasses.fields(LowRankArguments)})
    try:
        args = LowRankTrainingArguments(**{f.name: values[f.name] for f in dataclasses.fields(LowRankTrainingArguments)
                                           if f.init})
    except ValueError as e:  # TrainingArguments' own checks (--bf16 on a CPU, conflicting strategies, ...)
        text = one_line(e)
        if "support bf16/gpu" in text:
            text = ("--bf16 needs a GPU with bf16 support; on a CPU leave it out (or add --use_cpu true for bf16 "
                    f"autocast on the CPU). TrainingArguments says: {text}")
        raise UsageError(text) from None
    if lr_args.model is not None and not lr_args.model.strip():
        raise UsageError("--model is empty; pass a model folder or a Hub id, or leave it out for the built-in model")
    return lr_args, args


def _flags(message: str) -> str:
    """A LowRankConfig message in command-line terms: `LowRankConfig.r=0 ...` → `--r 0 ...`."""
    return re.sub(r"LowRankConfig\.(\w+)=", r"--\1 ", message)


def lowrank_config(a: LowRankArguments):
    from .config import LowRankConfig

    targets: str | list[str] = a.target_modules
    if targets != "all-linear" and "," in targets or targets.isidentifier():
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    quant = None if a.quantization.lower() in ("none", "") else a.quantization
    try:
        return LowRankConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
                             use_rslora=a.use_rslora, quantization=quant, compute_dtype=a.compute_dtype)
    except ValueError as e:
        raise UsageError(_flags(one_line(e))) from None


def check_model(model: str) -> str:
    """`--model` as it will be loaded (a folder as an absolute path, so the adapter records a base that resolves
    from anywhere); `UsageError` at once when it is neither a folder nor a repo the cache or the Hub has."""
    from .hub import source_problem

    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    problem = source_problem(model)
    if problem:
        raise UsageError(f"--model {model} {problem}; pass a model folder or a Hub id (e.g. Qwen/Qwen2.5-0.5B)")
    return model


def check_targets(model_path: str, config) -> None:
    """`--target_modules` against an empty (meta device) copy of the model, before any weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .inject import resolve_targets

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    except Exception:  # noqa: BLE001 - remote code, an unusual config...: the real load reports those
        return
    try:
        resolve_targets(skeleton, config)
    except ValueError as e:
        text = one_line(e)
        text = text[text.index("matched"):] if "matched" in text else text
        targets = config.target_modules
        targets = targets if isinstance(targets, str) else ",".join(targets)
        raise UsageError(f"--target_modules {targets} {text}") from None


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
    if not losses:
        return None
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


class LogLastStep(TrainerCallback):
    """Log the loss at the last step too, so a run shorter than --logging_steps still has a loss (and a plot)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control


@contextlib.contextmanager
def _no_progress_bars(active: bool = True):
    """transformers' "Writing model shards" / "Loading weights" bars, which are noise for the built-in tiny model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if active:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if active and was:
            hf_logging.enable_progress_bar()


def _one_thread_for_builtin() -> str:
    """The built-in model's matmuls are too small to gain from more CPU threads, and OpenMP threads that wait for a
    busy core make its 80 steps 5-20× slower on a shared machine (11 s on one thread, 56-260 s on two, measured on a
    busy 2-core machine). One thread on a CPU unless OMP_NUM_THREADS says otherwise; ", N CPU threads" for the
    banner."""
    import torch

    if torch.accelerator.is_available():
        return ""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    n = torch.get_num_threads()
    return f", {n} CPU thread{'s' if n != 1 else ''}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def train_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lr_args, args = parse(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    config = lowrank_config(lr_args)  # invalid LoRA fields fail here, before anything is loaded
    out = Path(args.output_dir).expanduser().resolve()
    builtin = lr_args.model is None
    model_path = None if builtin else check_model(lr_args.model)
    texts = load_texts(lr_args.data, lr_args.text_field)

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # the Trainer's imports take seconds

    from .data import build_default_base
    from .format import WEIGHTS_NAME
    from .integrations.callback import LowRankCallback
    from .loading import from_pretrained

    with _no_progress_bars(builtin):
        if builtin:
            model_path = str(build_default_base(out / "base-model"))
            length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
            print(f"no --model: using the built-in tiny Llama written to {model_path} (learning rate "
                  f"{args.learning_rate:g}, {length}{_one_thread_for_builtin()})")
        if lr_args.data is None:
            print("no --data: using the bundled corpus")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = block_dataset(texts, tokenizer, lr_args.max_length)
        check_targets(model_path, config)
        try:
            model = from_pretrained(AutoModelForCausalLM, model_path, config)
        except ValueError as e:  # the model does not fit the LoRA fields (or is not a causal LM)
            raise UsageError(_flags(one_line(e))) from None
    before = sample(model, tokenizer, lr_args.sample_prompt, lr_args.sample_tokens) if lr_args.sample_tokens else None
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[LowRankCallback(), LogLastStep()])
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(str(out))
    after = sample(model, tokenizer, lr_args.sample_prompt, lr_args.sample_tokens) if lr_args.sample_tokens else None
    if not trainer.is_world_process_zero():
        return 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    size = (out / WEIGHTS_NAME).stat().st_size
    plot = plot_losses(trainer.state.log_history, out / "loss.png")
    seconds = result.metrics.get("train_runtime", 0.0)
    print("\n" + "=" * 72)
    steps = trainer.state.global_step
    loss = f"; loss {losses[0]:.3f} -> {losses[-1]:.3f} (final)" if len(losses) > 1 else \
        f"; final loss {losses[-1]:.3f}" if losses else ""
    print(f"trained {steps} step{'s' if steps != 1 else ''} in {seconds:.0f} s{loss}")
    print(f"adapter:   {out} ({WEIGHTS_NAME}, {_size(size)})")
    if before is not None:
        print(f"before:    {before!r}")
        print(f"after:     {after!r}")
    if plot:
        print(f"loss plot: {plot}")
    print(f"load it:   hf_lowrank.load(AutoModelForCausalLM, {str(out)!r})")
    print(f"push it:   hf-lowrank push {out} YOUR-USER/NAME")
    return 0


__all__ = ["BUILTIN_DEFAULTS", "LowRankArguments", "LowRankTrainingArguments", "build_parser", "parse", "train_main"]
