"""The Trainer's seams: where transformers 5 assumes `peft`, and what hf_lowrank does there (group "trainer").

Each patch below is registered with what it replaces and the test that covers it; all are strict no-ops for models
without hf_lowrank adapters. Installed by `LowRankCallback()` and by `hf_lowrank.enable()`; undone by
`hf_lowrank.integrations.uninstall()`. The instance-level seams (the quantized-model gate's flag and the
adapter-only `save_pretrained`) are set by `hf_lowrank.loading.attach`, not here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

from ..atomic import atomic_write_files, interrupted_save
from ..format import CARD_NAME, CONFIG_NAME, FULL_MODEL_FILES, WEIGHTS_NAME
from ..inject import has_adapters
from .registry import register, wraps

logger = logging.getLogger("hf_lowrank")
DISTRIBUTED_TEST = ("tests/test_distributed.py::"
                    "test_resume_runs_only_the_remaining_steps_and_ends_where_the_full_run_ended")


def ours(model) -> bool:
    return model is not None and has_adapters(model)


def adapter_only(folder: str) -> bool:
    """A checkpoint holding our adapter and no full model."""
    return os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and not any(
        os.path.isfile(os.path.join(folder, f)) for f in FULL_MODEL_FILES)


# ---- checkpoints: resume and best model --------------------------------------------------------------------------


@register("transformers:Trainer._load_from_checkpoint", group="trainer",
          test="tests/test_trainer.py::test_resume_from_checkpoint_20_of_30_matches_uninterrupted",
          why="""transformers loads adapter-only checkpoints only for PeftModels (else it looks for model.safetensors
          and stops with "Can't find a valid checkpoint"); ours are loaded with hf_lowrank's strict loader.""")
def _wrap_load_from_checkpoint(original):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        if ours(target) and not self.is_fsdp_enabled and adapter_only(resume_from_checkpoint):
            from ..state import load_adapter

            logger.info("hf_lowrank: resuming adapter from %s", resume_from_checkpoint)
            load_adapter(target, resume_from_checkpoint)
            return None
        return original(self, resume_from_checkpoint, model)

    return wraps(original, _load_from_checkpoint)


@register("transformers:Trainer._load_best_model", group="trainer",
          test="tests/test_trainer.py::test_load_best_model_at_end",
          why="""load_best_model_at_end knows adapter-only checkpoints only for PeftModels (it would warn and keep
          the last weights); ours load the best checkpoint's adapter.""")
def _wrap_load_best_model(original):
    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if ours(self.model) and not self.is_deepspeed_enabled and not self.is_fsdp_enabled and best and \
                adapter_only(best):
            from ..state import load_adapter

            logger.info("hf_lowrank: loading best adapter from %s (score %s)", best, self.state.best_metric)
            load_adapter(self.model, best)
            return None
        return original(self)

    return wraps(original, _load_best_model)


CHECKPOINT_PREFIX, TRAINER_STATE = "checkpoint-", "trainer_state.json"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that a save finished (its trainer state written, its adapter
    files in place, no save of ours interrupted in it); each newer, unfinished one is named in a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(n[len(CHECKPOINT_PREFIX):]), n) for n in os.listdir(output_dir)
                   if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()
                   and os.path.isdir(os.path.join(output_dir, n)))
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        complete = os.path.isfile(os.path.join(folder, TRAINER_STATE)) and \
            os.path.isfile(os.path.join(folder, CONFIG_NAME)) and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) \
            and not interrupted_save(Path(folder))
        if complete:
            return folder
        logger.warning("hf_lowrank: skipping %s: its save did not finish (the run was killed while writing it)",
                       folder)
    return None


@register("transformers:Trainer.train", group="trainer",
          test="tests/test_hardening.py::test_resume_skips_a_checkpoint_killed_mid_save",
          why="""resume_from_checkpoint=True takes the newest checkpoint-N folder, even one a kill left with only
          a half-written save in it ("Can't find a valid checkpoint"); for ours it takes the newest complete one
          and says which it skipped.""")
def _wrap_train(original):
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True and ours(self.model):
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        return original(self, resume_from_checkpoint, *args, **kwargs)

    return wraps(original, train)


# ---- distributed: ZeRO-3 and FSDP save only the adapters, DeepSpeed resumes adapter-only state -------------------


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


@register("transformers:Trainer.save_model", group="trainer",
          test=DISTRIBUTED_TEST,
          why="""Under ZeRO-3 save_model gathers only trainable parameters for PeftModels (else it needs a
          full-model gather or writes an empty state dict); under FSDP it gathers the whole model or nothing. For
          ours both gather the trainable parameters only, on every rank, and the main process writes them.""")
def _wrap_save_model(original):
    def save_model(self, output_dir=None, _internal_call: bool = False):
        if not (ours(self.model) and (_zero3(self) or self.is_fsdp_enabled)):
            return original(self, output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = trainable_state_dict(self)  # collective: all ranks
        if self.args.should_save:
            logger.info("hf_lowrank: saving the gathered adapter (%d tensors) to %s", len(state_dict), output_dir)
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    return wraps(original, save_model)


@register("transformers:Trainer._save_optimizer_and_scheduler", group="trainer",
          test=DISTRIBUTED_TEST,
          why="""DeepSpeed's own checkpoint (engine.save_checkpoint) excludes frozen parameters only for PeftModels:
          for ours it then holds the adapters' module state and the optimizer, not the 4-bit base.""")
def _wrap_save_optimizer_and_scheduler(original):
    def _save_optimizer_and_scheduler(self, output_dir):
        engine = self.model_wrapped
        if not (self.is_deepspeed_enabled and ours(self.model) and hasattr(engine, "save_checkpoint")):
            return original(self, output_dir)
        save_checkpoint = engine.save_checkpoint
        engine.save_checkpoint = lambda *a, **k: save_checkpoint(*a, **{"exclude_frozen_parameters": True, **k})
        try:
            return original(self, output_dir)
        finally:
            del engine.save_checkpoint  # back to the class method

    return wraps(original, _save_optimizer_and_scheduler)


@register("transformers.trainer:deepspeed_load_checkpoint", group="trainer",
          test=DISTRIBUTED_TEST,
          why="""Resuming loads DeepSpeed's checkpoint with load_module_strict=True unless the model is a
          PeftModel; ours hold adapter-only module state, loaded non-strictly (the base comes from
          from_pretrained).""")
def _wrap_deepspeed_load_checkpoint(original):
    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, load_module_strict=True):
        if ours(getattr(deepspeed_engine, "module", None)):
            load_module_strict = False
        return original(deepspeed_engine, checkpoint_path, load_module_strict=load_module_strict)

    return wraps(original, deepspeed_load_checkpoint)


# ---- Hub: checkpoint pushes and the model card -----------------------------------------------------------------


TRAINING_ARGS = "training_args.bin"
_redacting: dict[type, type] = {}


def redact_hub_token(args) -> None:
    """Make `args` pickle without its `hub_token` (in memory it keeps it, for the pushes): its class becomes a
    subclass whose pickles name the original class and leave the token out, so `training_args.bin` loads as usual."""
    cls = type(args)
    if cls in _redacting.values() or not getattr(args, "hub_token", None):
        return
    if cls not in _redacting:
        def __reduce_ex__(self, protocol):  # rebuilt as the original class, by the standard library alone
            import copyreg

            state = {k: v for k, v in self.__dict__.items() if k != "hub_token"}
            return copyreg._reconstructor, (cls, object, None), state

        def __deepcopy__(self, memo):  # copies in memory keep the token (only pickles leave it out)
            import copy

            clone = object.__new__(type(self))
            memo[id(self)] = clone
            clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return clone

        def __copy__(self):
            clone = object.__new__(type(self))
            clone.__dict__.update(self.__dict__)
            return clone

        sub = type(cls.__name__, (cls,), {"__reduce_ex__": __reduce_ex__, "__deepcopy__": __deepcopy__,
                                          "__copy__": __copy__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _redacting[cls] = sub
    args.__class__ = _redacting[cls]


@register("transformers:Trainer._push_from_checkpoint", group="trainer",
          test="tests/test_hub.py::test_trainer_pushes_adapter_only",
          why="""It copies a checkpoint's adapter files into the pushed output_dir only when peft is installed
          (else each "Training in progress" commit carries no adapter): for ours we copy them ourselves. It also
          uploads training_args.bin, a pickle of the TrainingArguments that holds hub_token: for ours the pickles
          it uploads leave the token out.""")
def _wrap_push_from_checkpoint(original):
    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if ours(self.model) and self.is_world_process_zero():
            from ..hub import publish_in_place

            if getattr(self.args, "hub_token", None):
                import torch

                redact_hub_token(self.args)
                if os.path.isfile(os.path.join(checkpoint_folder, TRAINING_ARGS)):
                    torch.save(self.args, os.path.join(checkpoint_folder, TRAINING_ARGS))
            if not _pushes(self):  # transformers' own two early returns: nothing is published or copied then
                return original(self, checkpoint_folder)
            # the previous push may still be uploading `out` (run_as_future, hub_always_push): every file lands
            # there already published and whole (the checkpoint rewritten first, then copied in atomically)
            out = self.args.output_dir
            publish_in_place(checkpoint_folder)
            card = os.path.join(checkpoint_folder, CARD_NAME)
            names = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if os.path.isfile(os.path.join(checkpoint_folder, n))]
            if os.path.isfile(card) and not os.path.isfile(os.path.join(out, CARD_NAME)):
                names.append(CARD_NAME)
            atomic_write_files(Path(out), {n: functools.partial(shutil.copyfile, os.path.join(checkpoint_folder, n))
                                           for n in names})
            publish_in_place(out)
        return original(self, checkpoint_folder)

    return wraps(original, _push_from_checkpoint)


def _pushes(trainer) -> bool:
    """Whether `Trainer._push_from_checkpoint` goes on to copy a checkpoint into output_dir and push it: not with
    `hub_strategy="end"`, nor while the previous push is still uploading (unless `hub_always_push`)."""
    push = getattr(trainer, "push_in_progress", None)  # set once the Trainer made its Hub repo
    return trainer.args.hub_strategy != "end" and (trainer.args.hub_always_push or push is None or push.is_done())


def update_adapter_card(model, output_dir: str, repo_id: str | None = None) -> None:
    """Merge the adapter card into `output_dir/README.md` (the Trainer's summary); idempotent."""
    from ..card import merge_into_card
    from ..format import adapter_metadata, peft_config_dict

    path = os.path.join(output_dir, CARD_NAME)
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    merged = merge_into_card(text, peft_config_dict(model), adapter_metadata(model), repo_id=repo_id)
    with open(path, "w", encoding="utf-8") as f:
        f.write(merged)


@register("transformers:Trainer.create_model_card", group="trainer",
          test="tests/test_hub.py::test_trainer_pushes_adapter_only",
          why="""It overwrites README.md with its training summary and then, when the old card said
          library_name: peft, calls model.create_or_update_model_card, which only PeftModel has (AttributeError).
          Ours get one that merges the adapter card into the summary.""")
def _wrap_create_model_card(original):
    def create_model_card(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        if not ours(model) or not self.is_world_process_zero():
            return original(self, *args, **kwargs)
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        if getattr(self, "_hf_lowrank_pushing", False):  # inside push_to_hub: the folder is uploaded next
            from ..hub import publish_in_place

            publish_in_place(self.args.output_dir)
        model.create_or_update_model_card = lambda output_dir: update_adapter_card(model, output_dir, repo_id)
        original(self, *args, **kwargs)
        update_adapter_card(model, self.args.output_dir, repo_id)

    return wraps(original, create_model_card)


@register("transformers:Trainer.push_to_hub", group="trainer",
          test="tests/test_hub.py::test_trainer_pushes_adapter_only",
          why="""It uploads output_dir as it is: our adapter_config.json there may record the base as a local path,
          and training_args.bin is a pickle of the TrainingArguments holding hub_token. For ours, the token is left
          out of those pickles and the adapter files name a Hub id (or no base) before the upload.""")
def _wrap_push_to_hub(original):
    def push_to_hub(self, *args, **kwargs):
        if not ours(self.model):
            return original(self, *args, **kwargs)
        redact_hub_token(self.args)
        self._hf_lowrank_pushing = True
        try:
            return original(self, *args, **kwargs)
        finally:
            self._hf_lowrank_pushing = False

    return wraps(original, push_to_hub)


__all__ = ["adapter_only", "full_trainable_state_dict", "last_complete_checkpoint", "ours", "redact_hub_token",
           "trainable_state_dict", "update_adapter_card"]
