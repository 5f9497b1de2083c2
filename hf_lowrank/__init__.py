"""hf_lowrank: QLoRA for the Hugging Face Trainer with two added lines, without peft.

    import hf_lowrank
    hf_lowrank.enable(r=16, lora_alpha=32)
    model = AutoModelForCausalLM.from_pretrained(path)   # NF4 base + LoRA; only A and B train

Heavy optional dependencies (bitsandbytes, deepspeed, huggingface_hub, the Trainer) are imported where used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import LowRankConfig
from .hook import disable, enable, enabled, from_pretrained, load
from .inject import disabled_adapters, inject, lora_layers, merge, parameter_summary
from .layers import LoraLinear

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
    "LowRankCallback": "trainer",
    "save_adapter": "state",
    "load_adapter": "state",
    "push_adapter": "hub",
    "pull_adapter": "hub",
    "HubError": "hub",
    "AdapterError": "state",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_lowrank' has no attribute {name!r}")
