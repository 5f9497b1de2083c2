"""hf_lowrank: QLoRA for the Hugging Face Trainer with two added lines, without peft.

    import hf_lowrank
    hf_lowrank.enable(r=16, lora_alpha=32)
    model = AutoModelForCausalLM.from_pretrained(path)   # NF4 base + LoRA; only A and B train

Heavy optional dependencies (bitsandbytes, deepspeed, huggingface_hub, the Trainer) are imported where used; the
names below that need them are imported on first use.
"""

from __future__ import annotations

import importlib
import sys

from .config import LowRankConfig
from .inject import disabled_adapters, lora_layers, parameter_summary
from .layers import LoraLinear
from .loading import from_pretrained, inject, load, load_adapter
from .merge import merge
from .version import __version__

__all__ = [
    "AdapterError",
    "HubError",
    "LoraLinear",
    "LowRankCallback",
    "LowRankConfig",
    "__version__",
    "disable",
    "disabled_adapters",
    "enable",
    "enabled",
    "from_pretrained",
    "inject",
    "load",
    "load_adapter",
    "lora_layers",
    "merge",
    "parameter_summary",
    "pull_adapter",
    "push_adapter",
    "save_adapter",
]

_LAZY = {
    "LowRankCallback": "integrations.callback",
    "enable": "integrations.hook",
    "enabled": "integrations.hook",
    "save_adapter": "state",
    "push_adapter": "hub",
    "pull_adapter": "hub",
    "HubError": "hub",
    "AdapterError": "format",
}


def disable() -> None:
    """Remove the global `from_pretrained` hook (see `enable`); a no-op, importing nothing, when it was never on."""
    hook = sys.modules.get(f"{__name__}.integrations.hook")
    if hook is not None:
        hook.disable()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_lowrank' has no attribute {name!r}")
