"""`hf-lowrank train / push / pull / merge / inspect / export / doctor`.

Each command lives in the module that owns its work and exposes `main(argv)`; this file only dispatches, so
`hf-lowrank --help` stays fast and importing one command never imports the others' dependencies.

Every mistake ends in one line on stderr, `hf-lowrank COMMAND: error: MESSAGE`, and an exit code: 2 when the
command line is wrong (an unknown flag, an invalid value, a file or model that is not there), 1 when the work itself
failed (the Hub, an adapter file, training). `hf-lowrank --debug COMMAND ...` or `HF_LOWRANK_DEBUG=1` shows the
traceback instead. While a command runs, messages from libraries that tell the user nothing they can act on are
dropped (`quiet`); nothing is silenced by `import hf_lowrank`.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from .commandline import error_code, one_line, quiet

COMMANDS = {
    "train": ("hf_lowrank.train_cli", "train LoRA / QLoRA with the Trainer (every TrainingArguments flag works)"),
    "push": ("hf_lowrank.hub_cli", "push an adapter folder to the Hugging Face Hub"),
    "pull": ("hf_lowrank.hub_cli", "download an adapter from the Hub"),
    "merge": ("hf_lowrank.export", "fold an adapter into its base and write a standard 16-bit model folder"),
    "inspect": ("hf_lowrank.runtimes", "describe an adapter and what PEFT, vLLM and llama.cpp do with it"),
    "export": ("hf_lowrank.runtimes", "write an adapter for one runtime: --target peft, vllm or llama.cpp (GGUF)"),
    "doctor": ("hf_lowrank.doctor", "print the environment and refuse known-bad distributed setups"),
}
DEBUG_ENV = "HF_LOWRANK_DEBUG"

def _expected(e: BaseException) -> bool:
    """Errors whose message is written for the user (ours and the libraries' usual ones); others print their type."""
    expected: list[type[BaseException]] = [ValueError, OSError, ImportError]
    for module, name in (("hf_lowrank.hub", "HubError"), ("hf_lowrank.integrations.callback", "NoGradientError")):
        if module in sys.modules:  # a command that raised one has imported its module
            expected.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(expected))


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
        from .version import __version__

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
