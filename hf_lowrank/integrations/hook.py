"""The global hook behind the two added lines: `enable()` makes every `from_pretrained` load QLoRA (group "hook").

    hf_lowrank.enable(r=16)      PreTrainedModel.from_pretrained → hf_lowrank.from_pretrained (NF4 + LoRA)
                                 Trainer.__init__ → adds LowRankCallback for our models
                                 TrainingArguments → records which fields the user passed (an explicit optim wins)
                                 + the Trainer's seams ("trainer" group)
    hf_lowrank.disable()         from_pretrained is transformers' own again; the rest stay installed as no-ops
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from ..config import LowRankConfig
from ..launch import launch_kind
from ..loading import bypass_depth, from_pretrained
from . import callback as _callback  # noqa: F401 (registers TrainingArguments.__new__)
from . import transformers as _trainer_seams  # noqa: F401 (registers the "trainer" group)
from .registry import install, register, uninstall, wraps
from .trl import install_when_trl_imported

_active: LowRankConfig | None = None
FROM_PRETRAINED = "transformers:PreTrainedModel.from_pretrained"


@register(FROM_PRETRAINED, group="hook",
          test="tests/test_trainer.py::test_two_lines_train_qlora_with_adapter_only_checkpoints",
          why="""The promise of two added lines: an unmodified script's AutoModel*.from_pretrained must return the
          NF4 base with LoRA injected. Every Auto class ends in PreTrainedModel.from_pretrained.""")
def _wrap_from_pretrained(original):
    func = original.__func__  # a classmethod object

    def from_pretrained_hooked(cls, *args: Any, **kwargs: Any):
        if _active is None or bypass_depth() > 0:
            return func(cls, *args, **kwargs)
        if len(args) != 1:
            raise TypeError("with hf_lowrank enabled, from_pretrained() takes the model name or path as its only "
                            "positional argument; pass the rest as keywords")
        return from_pretrained(cls, args[0], _active, **kwargs)

    return classmethod(wraps(func, from_pretrained_hooked))


@register("transformers:Trainer.__init__", group="hook",
          test="tests/test_trainer.py::test_user_chosen_optim_is_kept_under_hook",
          why="""An unmodified script passes no callbacks: under the hook, a Trainer built for one of our models
          gets LowRankCallback (paged AdamW default, summary, no-gradient guard) unless it has one.""")
def _wrap_trainer_init(original):
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        if _active is not None:
            bound = signature.bind_partial(self, *args, **kwargs)
            if _trainer_seams.ours(bound.arguments.get("model")):
                from .callback import LowRankCallback

                callbacks = list(bound.arguments.get("callbacks") or [])
                if not any(isinstance(c, LowRankCallback) or c is LowRankCallback for c in callbacks):
                    callbacks.append(LowRankCallback(check_gradients=launch_kind() != "deepspeed"))
                bound.arguments["callbacks"] = callbacks
                args, kwargs = bound.args[1:], bound.kwargs
        original(self, *args, **kwargs)

    return wraps(original, __init__)


def enable(config: LowRankConfig | None = None, **fields: Any) -> LowRankConfig:
    """Install the hook: from now on `from_pretrained` gives a quantized base with LoRA; Trainers adapt to it.

    `enable(r=8, lora_alpha=16)` or `enable(LowRankConfig(...))`. Returns the config in force.
    """
    global _active
    if config is not None and fields:
        raise TypeError("enable() takes a LowRankConfig or keyword fields, not both")
    config = config if config is not None else LowRankConfig(**fields)
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"enable() expects a LowRankConfig, got {type(config).__name__}")
    install("trainer")
    install("hook")
    install_when_trl_imported()
    _active = config
    return config


def disable() -> None:
    """Remove the hook: `from_pretrained` is transformers' own again. Installs nothing."""
    global _active
    _active = None
    uninstall(target=FROM_PRETRAINED)


def active_config() -> LowRankConfig | None:
    return _active


@contextlib.contextmanager
def enabled(config: LowRankConfig | None = None, **fields: Any):
    """`with hf_lowrank.enabled(r=8): model = AutoModelForCausalLM.from_pretrained(p)`; the previous state after."""
    previous = _active
    enable(config, **fields)
    try:
        yield _active
    finally:
        if previous is None:
            disable()
        else:
            enable(previous)
