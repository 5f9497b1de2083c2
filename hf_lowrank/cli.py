"""`hf-lowrank train / push / pull / merge / inspect / export / doctor`.

Each command lives in the module that owns its work and exposes `main(argv)`; this file only dispatches, so
`hf-lowrank --help` stays fast and importing one command never imports the others' dependencies.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("hf_lowrank.train_cli", "train LoRA / QLoRA with the Trainer (every TrainingArguments flag works)"),
    "push": ("hf_lowrank.hub", "push an adapter folder to the Hugging Face Hub"),
    "pull": ("hf_lowrank.hub", "download an adapter from the Hub"),
    "merge": ("hf_lowrank.export", "fold an adapter into its base and write a standard 16-bit model folder"),
    "inspect": ("hf_lowrank.runtimes", "describe an adapter and what PEFT, vLLM and llama.cpp do with it"),
    "export": ("hf_lowrank.runtimes", "write an adapter for one runtime: --target peft, vllm or llama.cpp (GGUF)"),
    "doctor": ("hf_lowrank.doctor", "print the environment and refuse known-bad distributed setups"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-lowrank {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\nRun 'hf-lowrank COMMAND --help' for a command's options.")
        return 0
    if argv[0] in ("-V", "--version"):
        from .version import __version__

        print(f"hf-lowrank {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"hf-lowrank: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(getattr(module, f"{name}_main")(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
