"""What every `hf-lowrank` command shares: one-line errors with their exit codes, and quiet libraries.

Lives below the commands (`train`, `push` / `pull` in `hub`, `merge` / `inspect` in `export`) so each can use it
without importing the dispatcher (`hf_lowrank.cli`), which sits on top of them all.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import re
import sys
import warnings

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




def error_code(e: BaseException) -> int:
    """2 for a usage error (the command line is wrong), 1 for a failure."""
    return 2 if isinstance(e, UsageError) else 1
