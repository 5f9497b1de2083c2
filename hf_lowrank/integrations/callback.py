"""`LowRankCallback`: the Trainer-side policy for hf_lowrank models.

- paged AdamW (`paged_adamw_32bit`) when the user left `optim` at its default; an explicit choice wins;
- a start-of-training summary: base footprint, trainable parameters, quantization, optimizer, what is really paged;
- a silent-failure guard: after the first backward, every adapter parameter must have a gradient;
- LoRA+ (`LowRankConfig.loraplus_lr_ratio`): B at ratio × the learning rate, in whichever optimizer the Trainer builds.

Creating one installs the Trainer's seams (`hf_lowrank.integrations.transformers`: adapter-only checkpoints, resume,
best model, distributed saves, Hub pushes).
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import TrainerCallback

from ..fused_lm import enable_fused_loss, fused_loss_status
from ..inject import lora_layers, parameter_summary
from ..launch import launch_kind
from . import transformers as _trainer_seams  # noqa: F401 (registers the "trainer" group)
from .registry import install, register, wraps
from .trl import install_when_trl_imported

logger = logging.getLogger("hf_lowrank")

PAGED_OPTIM = "paged_adamw_32bit"
#: bitsandbytes pages an optimizer state tensor only from this many elements on (smaller ones stay in device memory).
PAGE_MIN_NUMEL = 100_000


# ---- which TrainingArguments fields the user passed ------------------------------------------------------------


@register("transformers:TrainingArguments.__new__", group="hook",
          test="tests/test_trainer.py::test_user_chosen_optim_is_kept_under_hook",
          why="""Under the two-line hook the paged optimizer is our default, but a user who passes optim= explicitly
          (even transformers' own default value) must keep it. A dataclass __init__ keeps no trace of which fields
          were passed, and the TrainingArguments object reaches us only after it is built. TrainingArguments defines
          no __new__, so adding one (which sees the keyword arguments and replaces no transformers code) is the
          least invasive hook; uninstall deletes it again. Comparing optim with its default instead would override
          a user who passed the default on purpose.""")
def _wrap_training_arguments_new(original):
    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_hf_lowrank_explicit"] = frozenset(kwargs)
        return obj

    return staticmethod(wraps(original, __new__))


def explicit_fields(args) -> frozenset[str] | None:
    """Fields passed to this `TrainingArguments` by name, or None when it was made before the hook was enabled."""
    return args.__dict__.get("_hf_lowrank_explicit")


# ---- LoRA+: B's learning rate is ratio × A's ------------------------------------------------------------------


@register("transformers:Trainer.create_optimizer", group="trainer",
          test="tests/test_quality.py::test_loraplus_groups_paged_default_and_explicit_optim",
          why="""LoRA+ needs B in its own parameter group at ratio × the learning rate. The Trainer builds its
          optimizer in create_optimizer (two weight-decay groups, whatever optim is) and the scheduler right after
          it, from the groups' learning rates; a callback sees the optimizer only at on_train_begin, after the
          scheduler has read them. Splitting the groups as create_optimizer returns, before the scheduler and
          before a resumed optimizer state is loaded, works for every optim (torch's, bitsandbytes' paged ones,
          the user's optimizer_cls_and_kwargs). A no-op without loraplus_lr_ratio or when the user passed an
          optimizer.""")
def _wrap_create_optimizer(original):
    def create_optimizer(self, model=None, *args, **kwargs):
        built_here = self.optimizer is None
        optimizer = original(self, model, *args, **kwargs)
        opt_model = self.model if model is None else model
        ratio = getattr(getattr(opt_model, "lowrank_config", None), "loraplus_lr_ratio", None)
        if built_here and ratio is not None:
            split_loraplus_groups(getattr(optimizer, "optimizer", optimizer), opt_model, ratio)
        return optimizer

    return wraps(original, create_optimizer)


def loraplus_params(model) -> list:
    """The parameters LoRA+ speeds up: every B, and DoRA magnitudes (1-D, grouped with B as PEFT's
    `create_loraplus_optimizer` does)."""
    out = []
    for _, layer in lora_layers(model):
        out.append(layer.lora_B.weight)
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None:
            out.append(magnitude)
    return out


def split_loraplus_groups(optimizer, model, ratio: float) -> int:
    """Move the `loraplus_params` of each parameter group into a copy of that group (same weight decay and
    hyper-parameters) with lr = ratio × the group's lr. Before the first step only. Returns how many moved."""
    fast = {id(p) for p in loraplus_params(model)}
    moved = 0
    for group in list(optimizer.param_groups):
        mine = [p for p in group["params"] if id(p) in fast]
        if not mine:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in fast]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                                   "lr": group["lr"] * ratio})
        moved += len(mine)
    logger.info("hf_lowrank: LoRA+ puts %d B tensors at %g x the learning rate", moved, ratio)
    return moved


class NoGradientError(RuntimeError):
    """Some adapters got no gradient in the first step: they would silently never train."""


class LowRankCallback(TrainerCallback):
    """Add to `Trainer(callbacks=[...])` when not using `hf_lowrank.enable()` (which adds it by itself).

    Args:
        default_optim: optimizer used when `TrainingArguments.optim` was left at its default (None keeps it).
        check_gradients: raise `NoGradientError` when an adapter gets no gradient in the first optimizer step.
    """

    def __init__(self, default_optim: str | None = PAGED_OPTIM, check_gradients: bool = True) -> None:
        install("trainer")
        install_when_trl_imported()
        self.default_optim = default_optim
        self.check_gradients = check_gradients
        self._checked = False

    # ---- optimizer default ----------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from transformers.training_args import OptimizerNames

        cfg = getattr(model, "lowrank_config", None)
        if cfg is not None and cfg.fused_loss:  # models injected without from_pretrained; before accelerate wraps
            enable_fused_loss(model)
        if self.default_optim is None:
            return
        default = next(f.default for f in dataclasses.fields(type(args)) if f.name == "optim")
        explicit = explicit_fields(args)
        chosen = explicit is not None and "optim" in explicit
        if not chosen and OptimizerNames(args.optim) == OptimizerNames(default) != OptimizerNames(self.default_optim):
            args.optim = OptimizerNames(self.default_optim)
            logger.info("hf_lowrank: optim left at its default (%s); using %s", OptimizerNames(default).value,
                        self.default_optim)

    # ---- summary --------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._checked = False
        if model is None or not state.is_world_process_zero:
            return
        logger.warning(training_summary(model, args, optimizer))

    # ---- silent-failure guard -------------------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._checked or not self.check_gradients or model is None or args.deepspeed or \
                launch_kind() == "deepspeed":  # DeepSpeed keeps gradients in its own buffers
            return
        self._checked = True
        check_adapter_gradients(model)


def check_adapter_gradients(model) -> None:
    """Raise `NoGradientError` naming the adapters whose A or B has no gradient, and the likely reason."""
    missing = [name for name, layer in lora_layers(model)
               if layer.lora_A.weight.grad is None or layer.lora_B.weight.grad is None]
    if not missing:
        return
    total = sum(1 for _ in lora_layers(model))
    if len(missing) == total and getattr(model, "is_gradient_checkpointing", False):
        why = ("gradient checkpointing is on and the checkpointed blocks' inputs do not require grad (frozen "
               "embeddings): call model.enable_input_require_grads() or use non-reentrant checkpointing "
               "(gradient_checkpointing_kwargs={'use_reentrant': False}, the default)")
    else:
        why = ("these layers never ran in the forward pass or their output does not reach the loss; drop them from "
               "target_modules (exclude_modules) or check that the loss uses them")
    raise NoGradientError(
        f"{len(missing)} of {total} LoRA layers got no gradient in the first step (e.g. {missing[:3]}): {why}.")


def training_summary(model, args=None, optimizer=None) -> str:
    s = parameter_summary(model)
    cfg = getattr(model, "lowrank_config", None)
    quant = "none (16-bit base)"
    if cfg is not None and cfg.quantization:
        quant = (f"{cfg.quantization.upper()}{' + double quant' if cfg.double_quant else ''}, compute "
                 f"{cfg.compute_dtype}, storage {cfg.quant_storage}")
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else s.base_bytes
    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))
    trainable = [p for p in model.parameters() if p.requires_grad]
    paged = [p for p in trainable if p.numel() >= PAGE_MIN_NUMEL]
    paged_note = "no"
    on_cpu = all(p.device.type == "cpu" for p in trainable)
    if optim and "paged" in str(optim) and on_cpu:
        paged_note = "none: bitsandbytes does not page on CPU (its paged optimizers fall back to plain state there)"
    elif optim and "paged" in str(optim):
        paged_note = (f"{len(paged)} of {len(trainable)} trainable tensors ({sum(p.numel() for p in paged):,} params); "
                      f"bitsandbytes pages only tensors of >= {PAGE_MIN_NUMEL:,} elements")
    loraplus = getattr(cfg, "loraplus_lr_ratio", None)
    return "\n".join([
        "hf_lowrank training summary",
        f"  base footprint : {footprint / 2**20:.2f} MiB (model.get_memory_footprint())",
        f"  parameters     : {s}",
        f"  quantization   : {quant}",
        f"  optimizer      : {optim}" + (f" (LoRA+: B at {loraplus:g} x the learning rate)" if loraplus else ""),
        f"  paged state    : {paged_note}",
        f"  loss path      : {fused_loss_status(model)}",
    ])
