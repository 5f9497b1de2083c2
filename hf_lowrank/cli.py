"""`hf-lowrank train / push / pull / merge / inspect / doctor`.

Each command lives in the module that owns its work and exposes `main(argv)`; this file only dispatches, so
`hf-lowrank --help` stays fast and importing one command never imports the others' dependencies.

Every mistake ends in one line on stderr, `hf-lowrank COMMAND: error: MESSAGE`, and an exit code: 2 when the
command line is wrong (an unknown flag, an invalid value, a file or model that is not there), 1 when the work itself
failed (the Hub, an adapter file, training). `hf-lowrank --debug COMMAND ...` or `HF_LOWRANK_DEBUG=1` shows the
traceback instead. While a command runs, messages from libraries that tell the user nothing they can act on are
dropped (`quiet`); nothing is silenced by `import hf_lowrank`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import re
import sys
import warnings

COMMANDS = {
    "train": ("hf_lowrank.train_cli", "train LoRA / QLoRA with the Trainer (every TrainingArguments flag works)"),
    "push": ("hf_lowrank.hub", "push an adapter folder to the Hugging Face Hub"),
    "pull": ("hf_lowrank.hub", "download an adapter from the Hub"),
    "merge": ("hf_lowrank.export", "fold an adapter into its base and write a standard 16-bit model folder"),
    "inspect": ("hf_lowrank.export", "describe an adapter and which runtimes accept it"),
    "doctor": ("hf_lowrank.doctor", "print the environment and refuse known-bad distributed setups"),
}
DEBUG_ENV = "HF_LOWRANK_DEBUG"

#: (logger, message start) pairs dropped while a command runs: true, but nothing a user can act on.
QUIET_LOGS = (
    # bitsandbytes on a CPU with avx512_bf16, at import, when the optional `kernels` package is missing; it falls
    # back to its own kernel
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # DeepSpeed (imported by accelerate / transformers when installed) on a machine without a GPU, printed on stdout
    ("DeepSpeed", "Setting accelerator to CPU"),
    # matplotlib, the first time it is imported under a new MPLCONFIGDIR (the loss plot)
    ("matplotlib.font_manager", "Matplotlib is building the font cache"),
)
#: warning messages (regexes matched at their start) dropped while a command runs.
QUIET_WARNINGS = (
    # bitsandbytes' paged AdamW on CPU: the training summary already says that nothing is paged there
    r"Paged optimizers are not supported on CPU",
)


class UsageError(ValueError):
    """A command-line value that cannot work (a missing file, an invalid LoRA field): one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: MESSAGE` (and the closest flag for a misspelled one), exit 2."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("--"):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def report(prog: str, e: BaseException) -> int:
    """Print `e` as one line for `prog` on stderr; returns the exit code (2 for a usage error, else 1)."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return error_code(e)


class _DropMessages(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextlib.contextmanager
def quiet():
    """Drop `QUIET_LOGS` and `QUIET_WARNINGS` inside the block; every logger and warning filter is restored after.

    The filters sit on the loggers themselves, so they hold for a library that adds its own handler on import
    (DeepSpeed does, on stdout) as long as it is imported inside the block.
    """
    added = []
    for name, start in QUIET_LOGS:
        f = _DropMessages(start)
        logging.getLogger(name).addFilter(f)
        added.append((name, f))
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for name, f in added:
            logging.getLogger(name).removeFilter(f)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (some libraries' messages span several)."""
    text = re.sub(r"\s*\n\s*", " ", str(e)).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    return text or type(e).__name__


def _expected(e: BaseException) -> bool:
    """Errors whose message is written for the user (ours and the libraries' usual ones); others print their type."""
    expected: list[type[BaseException]] = [ValueError, OSError, ImportError]
    for module, name in (("hf_lowrank.hub", "HubError"), ("hf_lowrank.trainer", "NoGradientError")):
        if module in sys.modules:  # a command that raised one has imported its module
            expected.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(expected))


def error_code(e: BaseException) -> int:
    return 2 if isinstance(e, UsageError) else 1


def _usage(stream) -> None:
    print("usage: hf-lowrank [--debug] {" + ",".join(COMMANDS) + "} ...\n", file=stream)
    for name, (_, text) in COMMANDS.items():
        print(f"  {name:<8} {text}", file=stream)
    print("\nRun 'hf-lowrank COMMAND --help' for a command's options. --debug (or HF_LOWRANK_DEBUG=1) shows the "
          "traceback of an error instead of its one-line message.", file=stream)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled()
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if not argv:
        _usage(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        _usage(sys.stdout)
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"hf-lowrank {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"hf-lowrank: error: unknown command {name!r}{hint} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    prog = f"hf-lowrank {name}"
    with quiet():
        try:
            module = importlib.import_module(COMMANDS[name][0])
            return int(getattr(module, f"{name}_main")(argv[1:]) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            text = one_line(e)
            if not _expected(e):
                text = f"{type(e).__name__}: {text} (unexpected: run `hf-lowrank --debug {name} ...` for the traceback)"
            print(f"{prog}: error: {text}", file=sys.stderr)
            return error_code(e)


if __name__ == "__main__":
    sys.exit(main())
