"""The one module that touches transformers internals: where transformers 5 assumes `peft`, and what we do there.

1. `Trainer.__init__` (`validate_quantization_for_training`) refuses a quantized model unless it is a `PeftModel` or
   has `_hf_peft_config_loaded`: we set the flag on models we inject into.
2. That flag sends `PreTrainedModel.save_pretrained` down a path that imports `peft`, so those models get their own
   `save_pretrained` (adapter files only). The flag also makes checkpointing enable input grads, which we want.
3. `Trainer._save` hands `save_pretrained` the state dict DeepSpeed / FSDP already gathered: we filter that one.
4. `Trainer._load_from_checkpoint` and `_load_best_model` know adapter-only checkpoints only for `PeftModel`s: we
   load ours there (everything else goes to transformers' own code).
5. Under the global hook, `Trainer.__init__` adds `LowRankCallback` (paged AdamW default, summary, gradient guard),
   and `TrainingArguments` records which fields the user passed, so an explicit `optim` wins.
6-8. Distributed: ZeRO-3 / FSDP saves gather only the adapters; DeepSpeed checkpoints and resumes adapter-only state.
9-10. Hub: checkpoint pushes carry the adapter files; the Trainer's model card works without `PeftModel`.
11. Merge from files: which layers `from_pretrained` stored in 4 bits is decided by transformers' own bitsandbytes
   quantizer, asked on a weightless copy of the model.
12. Launch detection: the DeepSpeed config a live `TrainingArguments(deepspeed=...)` registered with transformers
   decides the device map (none under ZeRO-3) and the 4-bit storage dtype.
(Each is described where it is implemented, below.)

Seams 1-5 are tested in tests/test_seams.py, 6-8 and 12 in tests/test_distributed.py, 9-10 in tests/test_hub.py, 11
in tests/test_export.py; each test fails loudly when transformers moves its seam.
"""

from __future__ import annotations

import inspect
import logging
import os
import types

logger = logging.getLogger("hf_lowrank")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_hooked = False
_installed = False


def attach(model) -> None:
    """Mark an injected model so that transformers treats it as an adapter model (seams 1-3)."""
    model._hf_peft_config_loaded = True
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    install()


def _save_pretrained(self, save_directory, *, is_main_process: bool = True, state_dict=None, push_to_hub=False,
                     **kwargs):
    """Write the adapter (PEFT's files) instead of the full model; `state_dict` is used when given (seam 3)."""
    from .state import save_adapter

    if not is_main_process:
        return
    save_adapter(self, save_directory, state_dict=state_dict)
    if push_to_hub:
        from .hub import push_adapter

        repo_id = kwargs.pop("repo_id", os.path.basename(os.fspath(save_directory).rstrip("/")))
        push_adapter(save_directory, repo_id, commit_message=kwargs.get("commit_message"),
                     token=kwargs.get("token"), private=kwargs.get("private", False))


def install(hooked: bool | None = None) -> None:
    """Patch `Trainer` and `TrainingArguments` once (idempotent). Patched methods change nothing for other models."""
    global _hooked, _installed
    if hooked is not None:
        _hooked = hooked
    if _installed:
        return
    from transformers import Trainer, TrainingArguments

    _installed = True
    Trainer.__init__ = _wrap_init(Trainer.__init__)
    Trainer._load_from_checkpoint = _wrap_load_from_checkpoint(Trainer._load_from_checkpoint)
    Trainer._load_best_model = _wrap_load_best_model(Trainer._load_best_model)
    install_hub_seams(Trainer)
    Trainer.save_model = _wrap_save_model(Trainer.save_model)
    Trainer._save_optimizer_and_scheduler = _wrap_save_optimizer_and_scheduler(Trainer._save_optimizer_and_scheduler)
    _wrap_deepspeed_load_checkpoint()
    if "__new__" not in TrainingArguments.__dict__:
        TrainingArguments.__new__ = staticmethod(_training_arguments_new)


def _training_arguments_new(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__["_hf_lowrank_explicit"] = frozenset(kwargs)  # which fields the user passed (seam 5)
    return obj


def explicit_fields(args) -> frozenset[str] | None:
    """Fields passed to this `TrainingArguments` by name, or None when it was made before hf_lowrank was active."""
    return args.__dict__.get("_hf_lowrank_explicit")


def _deepspeed_launch() -> bool:
    """Under DeepSpeed (`accelerate launch` with a DeepSpeed config) gradients live in ZeRO's buffers, not `.grad`."""
    from .quantize import launch_kind

    return launch_kind() == "deepspeed"


def _ours(model) -> bool:
    from .inject import has_adapters

    return model is not None and has_adapters(model)


def _wrap_init(original):
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        if _hooked:
            bound = signature.bind_partial(self, *args, **kwargs)
            model = bound.arguments.get("model")
            if _ours(model):
                from .trainer import LowRankCallback

                callbacks = list(bound.arguments.get("callbacks") or [])
                if not any(isinstance(c, LowRankCallback) or c is LowRankCallback for c in callbacks):
                    callbacks.append(LowRankCallback(check_gradients=not _deepspeed_launch()))
                bound.arguments["callbacks"] = callbacks
                args, kwargs = bound.args[1:], bound.kwargs
        original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    return __init__


def _adapter_only(folder: str) -> bool:
    full = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)) and not any(
        os.path.isfile(os.path.join(folder, f)) for f in full)


def _wrap_load_from_checkpoint(original):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        if _ours(target) and not self.is_fsdp_enabled and _adapter_only(resume_from_checkpoint):
            from .state import load_adapter

            logger.info("hf_lowrank: resuming adapter from %s", resume_from_checkpoint)
            load_adapter(target, resume_from_checkpoint)
            return None
        return original(self, resume_from_checkpoint, model)

    _load_from_checkpoint.__wrapped__ = original
    return _load_from_checkpoint


def _wrap_load_best_model(original):
    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if _ours(self.model) and not self.is_deepspeed_enabled and not self.is_fsdp_enabled and best and \
                _adapter_only(best):
            from .state import load_adapter

            logger.info("hf_lowrank: loading best adapter from %s (score %s)", best, self.state.best_metric)
            load_adapter(self.model, best)
            return None
        return original(self)

    _load_best_model.__wrapped__ = original
    return _load_best_model


# ---- distributed seams (6-8): ZeRO-3 and FSDP save only the adapters, DeepSpeed resumes adapter-only state --------
#
# 6. `Trainer.save_model` under ZeRO-3 gathers only trainable parameters for `PeftModel`s and otherwise needs
#    `stage3_gather_16bit_weights_on_model_save` (a full-model gather) or writes an empty state dict; under FSDP it
#    gathers the whole model (FULL_STATE_DICT) or nothing (SHARDED_STATE_DICT). For our models both gather the
#    trainable parameters only, on every rank, and the main process writes them.
# 7. DeepSpeed's own checkpoint (`engine.save_checkpoint`) excludes frozen parameters only for `PeftModel`s: for ours
#    it holds the adapters' module state and the optimizer, not the 4-bit base.
# 8. Resuming loads that checkpoint with `load_module_strict=True` unless the model is a `PeftModel`: for ours the
#    module state is adapter-only, so it is loaded non-strictly (the base comes from from_pretrained).


def _zero3(trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled and trainer.deepspeed is not None
                and trainer.deepspeed.zero_optimization_partition_weights())


def trainable_state_dict(trainer) -> dict | None:
    """The trainable parameters of `trainer.model`, whole, on the main process (None elsewhere).

    A collective under ZeRO-3 and FSDP: every rank must call it. ZeRO-3 uses DeepSpeed's layer-by-layer gather with
    frozen parameters excluded; FSDP uses torch's `get_model_state_dict(full_state_dict, ignore_frozen_params)`.
    """
    if _zero3(trainer):
        return trainer.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    if trainer.is_fsdp_enabled:
        return full_trainable_state_dict(trainer.model_wrapped)
    return None


def full_trainable_state_dict(model) -> dict:
    """Trainable parameters of an FSDP (1 or 2) model gathered whole on CPU; collective, every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def _wrap_save_model(original):
    def save_model(self, output_dir=None, _internal_call: bool = False):
        if not (_ours(self.model) and (_zero3(self) or self.is_fsdp_enabled)):
            return original(self, output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = trainable_state_dict(self)  # collective: all ranks
        if self.args.should_save:
            logger.info("hf_lowrank: saving the gathered adapter (%d tensors) to %s", len(state_dict), output_dir)
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    save_model.__wrapped__ = original
    return save_model


def _wrap_save_optimizer_and_scheduler(original):
    def _save_optimizer_and_scheduler(self, output_dir):
        engine = self.model_wrapped
        if not (self.is_deepspeed_enabled and _ours(self.model) and hasattr(engine, "save_checkpoint")):
            return original(self, output_dir)
        save_checkpoint = engine.save_checkpoint
        engine.save_checkpoint = lambda *a, **k: save_checkpoint(*a, **{"exclude_frozen_parameters": True, **k})
        try:
            return original(self, output_dir)
        finally:
            del engine.save_checkpoint  # back to the class method

    _save_optimizer_and_scheduler.__wrapped__ = original
    return _save_optimizer_and_scheduler


def _wrap_deepspeed_load_checkpoint() -> None:
    """`transformers.trainer.deepspeed_load_checkpoint` loads our adapter-only module state non-strictly."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint
    if getattr(original, "__wrapped__", None) is not None:
        return

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, load_module_strict=True):
        if _ours(getattr(deepspeed_engine, "module", None)):
            load_module_strict = False
        return original(deepspeed_engine, checkpoint_path, load_module_strict=load_module_strict)

    deepspeed_load_checkpoint.__wrapped__ = original
    hf_trainer.deepspeed_load_checkpoint = deepspeed_load_checkpoint


# ---- Hub seams (9-10): `TrainingArguments(push_to_hub=True)` for adapter models ------------------------------------
#
# 9. `Trainer._push_from_checkpoint` copies a checkpoint's adapter files into the pushed `output_dir` only when
#    `peft` is installed (else each "Training in progress" commit carries no adapter): for our models we copy
#    `adapter_model.safetensors` and `adapter_config.json` (and the card when there is none) ourselves.
# 10. `Trainer.create_model_card` overwrites README.md with its training summary and then, when the card it replaced
#    said `library_name: peft`, calls `model.create_or_update_model_card(output_dir)`, which only `PeftModel` has
#    (AttributeError otherwise). Our models get one that merges the adapter card (library_name, base_model, tags,
#    settings, usage) into the summary; it also runs when the old card was not an adapter card.


def install_hub_seams(trainer_cls) -> None:
    """Wrap `_push_from_checkpoint` and `create_model_card` of `trainer_cls` (called once by `install`)."""
    trainer_cls._push_from_checkpoint = _wrap_push_from_checkpoint(trainer_cls._push_from_checkpoint)
    trainer_cls.create_model_card = _wrap_create_model_card(trainer_cls.create_model_card)


def _wrap_push_from_checkpoint(original):
    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if _ours(self.model) and self.is_world_process_zero():
            import shutil

            out = self.args.output_dir
            for name in (ADAPTER_WEIGHTS, "adapter_config.json"):
                if os.path.isfile(os.path.join(checkpoint_folder, name)):
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(out, name))
            card = os.path.join(checkpoint_folder, "README.md")
            if os.path.isfile(card) and not os.path.isfile(os.path.join(out, "README.md")):
                shutil.copy(card, os.path.join(out, "README.md"))
        return original(self, checkpoint_folder)

    _push_from_checkpoint.__wrapped__ = original
    return _push_from_checkpoint


def _update_adapter_card(model, output_dir: str, repo_id: str | None = None) -> None:
    """Merge the adapter card into `output_dir/README.md` (the Trainer's summary); idempotent."""
    from .card import merge_into_card
    from .state import adapter_metadata, peft_config_dict

    path = os.path.join(output_dir, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    merged = merge_into_card(text, peft_config_dict(model), adapter_metadata(model), repo_id=repo_id)
    with open(path, "w", encoding="utf-8") as f:
        f.write(merged)


def _wrap_create_model_card(original):
    def create_model_card(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        if not _ours(model) or not self.is_world_process_zero():
            return original(self, *args, **kwargs)
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        model.create_or_update_model_card = lambda output_dir: _update_adapter_card(model, output_dir, repo_id)
        original(self, *args, **kwargs)
        _update_adapter_card(model, self.args.output_dir, repo_id)

    create_model_card.__wrapped__ = original
    return create_model_card


# ---- merge seam (11): which layers the QLoRA load stored in 4 bits ----------------------------------------------


def quantized_modules(model, quantization_config) -> set[str]:
    """Names of the modules that `from_pretrained(..., quantization_config=...)` turns into `Linear4bit`, decided by
    transformers' own quantizer (its skip list: heads, tied weights, `llm_int8_skip_modules`) on `model`, a
    meta-device copy that this call changes. `hf-lowrank merge` folds deltas onto exactly those layers' NF4 values."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return {name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}


# ---- launch seam (12): the DeepSpeed config TrainingArguments registered -----------------------------------------


def live_deepspeed_config() -> dict | None:
    """The DeepSpeed config dict that a live `TrainingArguments(deepspeed=...)` registered (transformers keeps a
    weak reference to it), or None."""
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config()
