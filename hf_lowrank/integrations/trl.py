"""TRL's trainers on hf_lowrank models: the reference is the policy with its adapters off, never a second model.

TRL decides with `accelerate.utils.is_peft_model` (an isinstance check against `peft.PeftModel`) whether a reference
can be had by disabling adapters; for any other model, DPO / KTO build a second model from its path and GRPO / RLOO
do whenever beta != 0. For ours, the patches below (groups "trl.<trainer>", installed when that TRL module is
imported; see `install_when_trl_imported`) hand TRL a `ReferenceView` instead:

    ReferenceView(policy)(**batch)   ==   with torch.no_grad(), hf_lowrank.disabled_adapters(policy): policy(**batch)

It owns no parameters and no modules (TRL's dropout switch, device moves and evaluation-mode wrapping of the
reference touch nothing of the policy), and TRL's own forward replacements on it (`add_fused_lm_head`) still run
inside that context, since the context is entered in `__call__`. Precomputed reference log-probs use it too.
TRL stays optional: nothing here imports it until one of its trainer modules is imported by the user.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch
from torch import nn

from ..inject import disabled_adapters
from ..layers import SavedModule, TiedTokenHead
from ..loading import our_head
from ..loss import LOG_PROB_OUTPUTS, linear_log_probs
from .registry import install, register, wraps
from .transformers import ours, update_adapter_card

#: TRL module → (trainer class, whether its __init__ takes `ref_model`).
TRAINERS = {
    "trl.trainer.dpo_trainer": ("DPOTrainer", True),
    "trl.trainer.kto_trainer": ("KTOTrainer", True),
    "trl.trainer.grpo_trainer": ("GRPOTrainer", False),
    "trl.trainer.rloo_trainer": ("RLOOTrainer", False),
}
TEST = "tests/test_trl.py::test_dpo_two_lines_no_second_model_and_exact_reference"
_context = threading.local()


class ReferenceView(nn.Module):
    """The reference model of preference / RL training: `policy` with every adapter (and saved module) disabled,
    without gradients. Holds the policy outside the module tree, so it owns no parameters of its own."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: nothing of the policy is reachable from here

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), disabled_adapters(self.policy):
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    def state_dict(self, *args, **kwargs):  # what TRL hashes to name cached reference log-probs
        return self.policy.state_dict(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.policy, name)  # config, device, dtype, generation_config ...


def _policy_context(policy):
    @contextlib.contextmanager
    def context():
        previous = getattr(_context, "policy", None)
        _context.policy = policy if ours(policy) else None
        try:
            yield
        finally:
            _context.policy = previous

    return context()


def _wrap_init(original, takes_ref_model: bool):
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        model = bound.arguments.get("model")
        if takes_ref_model and ours(model) and bound.arguments.get("ref_model") is None:
            bound.arguments["ref_model"] = ReferenceView(model)
            args, kwargs = bound.args[1:], bound.kwargs
        with _policy_context(model):
            original(self, *args, **kwargs)

    return wraps(original, __init__)


def _wrap_create_model_from_path(original):
    def create_model_from_path(*args, **kwargs):
        policy = getattr(_context, "policy", None)
        if policy is not None:  # the policy is ours and known: this is the reference
            return ReferenceView(policy)
        model = original(*args, **kwargs)
        if ours(model) and hasattr(_context, "policy"):  # the policy, loaded by TRL under the two-line hook
            _context.policy = model
        return model

    return wraps(original, create_model_from_path)


for _module, (_cls, _takes_ref) in TRAINERS.items():
    _group = "trl." + _cls
    register(f"{_module}:{_cls}.__init__", group=_group, test=TEST,
             why=f"""{_cls} builds a second copy of the base as its reference for any model that is not a peft
             PeftModel; for ours it gets a ReferenceView (the policy with adapters disabled)
             {'passed as ref_model' if _takes_ref else 'through create_model_from_path'}.""")(
        lambda original, t=_takes_ref: _wrap_init(original, t))
    register(f"{_module}:create_model_from_path", group=_group, test=TEST,
             why=f"""{_cls} loads its reference with create_model_from_path; while it is being built for one of our
             policies that call returns the ReferenceView instead of a second model.""")(_wrap_create_model_from_path)


@register("trl.trainer.base_trainer:_BaseTrainer.create_model_card", group="trl.card",
          test="tests/test_trl.py::test_dpo_resume_and_card",
          why="""TRL's trainers replace Trainer.create_model_card with their own card (which trainer made it) and
          so skip ours: for our models the adapter card (library_name: peft, base, settings, usage) is merged into
          TRL's, and a push publishes no local path.""")
def _wrap_create_model_card(original):
    def create_model_card(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        if not ours(model) or not self.is_world_process_zero():
            return original(self, *args, **kwargs)
        if getattr(self, "_hf_lowrank_pushing", False):
            from ..hub import publish_in_place

            publish_in_place(self.args.output_dir)
        original(self, *args, **kwargs)
        update_adapter_card(model, self.args.output_dir, getattr(self, "hub_model_id", None) or
                            self.args.hub_model_id)

    return wraps(original, create_model_card)


@register("trl.trainer.utils:_ChunkedLogProbFunction", group="trl.logprobs",
          test="tests/test_trl_logprobs.py::test_trl_fused_head_runs_ours_for_our_models_only",
          why="""TRL's fused LM head (add_fused_lm_head; every trainer's fused_lm_head=True forward) reads only
          lm_head.weight, so for a tied head with trained token rows (TiedTokenHead) its log-probs ignore those rows.
          And where TRL has no Triton kernel (CPU) it folds tiles of 4,096 tokens × 32,768 vocab with torch ops that
          each make an fp32 copy of the tile (about eight alive at once: ~75 MiB at 1,144 tokens × 2,048, GiBs at a
          128k vocabulary), then recomputes every tile in the backward. For the frozen heads of our models (on CPU,
          and anywhere for token rows) loss.linear_log_probs computes the same per-token values, the token columns
          included, in chunks of the loss's budget with the gradient taken in the forward; other models, trainable
          heads and Triton devices keep TRL's.""")
def _wrap_log_probs(original):
    class ChunkedLogProbFunction:
        """TRL's `ChunkedLogProbFunction.apply`, through `hf_lowrank.loss.linear_log_probs` for our heads."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, outputs=LOG_PROB_OUTPUTS):
            head = our_head(weight)
            inner = head.active if isinstance(head, SavedModule) else head  # modules_to_save: the copy in use
            low_rank = inner.low_rank(hidden) if isinstance(inner, TiedTokenHead) else None
            trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
            if low_rank is not None and trainable:
                raise ValueError("TRL's fused LM head on a trainable head with trained token rows: train "
                                          "the head or the token rows, not both")
            if head is None or trainable or (hidden.device.type != "cpu" and low_rank is None):
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            return linear_log_probs(hidden, weight, targets, bias=bias, temperature=temperature,
                                    softcap=final_logit_softcapping, logit_scale=logit_scale, outputs=outputs,
                                    low_rank=low_rank)

    ChunkedLogProbFunction.__wrapped__ = original
    return ChunkedLogProbFunction


# ---- installing when TRL is imported ------------------------------------------------------------------------------


BASE_TRAINER = "trl.trainer.base_trainer"
UTILS = "trl.trainer.utils"
WATCHED = {BASE_TRAINER, UTILS, *TRAINERS}


def _install_module(name: str) -> None:
    """Install the patches of one fully imported TRL module."""
    import sys

    module = sys.modules.get(name)
    if name == BASE_TRAINER and hasattr(module, "_BaseTrainer"):
        install("trl.card")
    elif name == UTILS and hasattr(module, "_ChunkedLogProbFunction"):
        install("trl.logprobs")
    elif name in TRAINERS and hasattr(module, TRAINERS[name][0]):
        install("trl." + TRAINERS[name][0])


def install_loaded() -> None:
    """Install the patches of every TRL module that is already imported."""
    for name in (UTILS, BASE_TRAINER, *TRAINERS):
        _install_module(name)


class _AfterImport:
    """A meta-path finder that lets the normal import run, then installs the patches of the TRL trainer modules
    it imported (TRL is heavy and optional: it is never imported for the user's sake)."""

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED:
            return None
        import importlib.machinery
        import sys

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            exec_module = spec.loader.exec_module

            def exec_then_install(module):
                exec_module(module)
                _install_module(name)

            spec.loader.exec_module = exec_then_install
        return spec


_finder = _AfterImport()


def install_when_trl_imported() -> None:
    """Install the TRL patches now for what is imported, and for the rest when (if ever) it gets imported."""
    import sys

    install_loaded()
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
