"""The causal-LM training forward without logits: a transformers model's decoder, then `loss.linear_cross_entropy`.

``fused_lm_supported(model) -> True | str``
    True when a transformers causal LM can take the fused path, else the reason it cannot (for a summary line). It
    needs: a decoder (``get_decoder()``, else ``getattr(model, model.base_model_prefix)``) that is a child of the
    model; ``get_output_embeddings()`` returning a float ``nn.Linear`` or an hf_lowrank ``LoraLinear`` around one
    (handled exactly: the adapter's low-rank term joins the chunked matmul; a 4-bit or 8-bit head, or a DoRA one, is
    refused);
    ``loss_function`` being transformers' ``ForCausalLMLoss``; and a ``forward`` whose source (read with ``ast``,
    `lm_forward`)
    calls the decoder, feeds the head the decoder's last hidden state unchanged (MiniCPM3 divides it by
    ``logits_scaling``), computes ``logits = self.<head>(…)``, changes the logits only by an upcast or inside an
    ``if …final_logit_softcapping…`` block (read from the config; no in-place writes, Chameleon masks image tokens
    so), and assigns ``loss`` only from
    ``self.loss_function(…)`` (so no logit scaling — Cohere's ``logit_scale``, Granite's ``logits_scaling``, … — and
    no auxiliary loss, e.g. MoE router losses, is silently dropped: those models keep the stock path).

``fused_causal_lm_forward(model, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kw)``
    Runs the decoder with the remaining keyword arguments (``position_ids``, ``inputs_embeds``, ``use_cache``, …),
    then ``linear_cross_entropy`` over its last hidden state; honours ``shift_labels`` (padding-free collators) and
    ``ignore_index``. Returns ``CausalLMOutputWithPast(loss=…, logits=None, …)``: **no logits** (with
    ``return_dict=False`` the stock tuple's positions, logits None).

``enable_fused_loss(model, chunk_size=None, recompute=False) -> str`` / ``disable_fused_loss(model) -> None`` /
``fused_loss_status(model) -> str`` (the same summary line for a model as it is now)
    Installs an instance-level ``model.forward`` (no class is patched) that takes the fused path only when
    ``model.training`` and ``labels`` are given; evaluation, generation and label-less calls (TRL's or the Trainer's
    own losses, label smoothing, ``compute_loss_func``) run the original forward unchanged. The wrapper keeps the
    original signature (``inspect.signature(model.forward)`` is unchanged, so the Trainer's
    ``model_accepts_loss_kwargs`` still sees ``**kwargs`` and passes ``num_items_in_batch``; ``generate`` validates
    against it too) and has no ``__wrapped__`` (so accelerate's ``unwrap_model`` keeps it). Calls with TRL's
    ``fused_lm_head=True`` go to the forward underneath (TRL's own chunked head, see below). Returns the summary
    line: ``"fused linear+cross-entropy (chunks of N tokens, …)"`` or ``"stock (<reason>)"``; calling it again
    updates the settings. ``disable_fused_loss`` restores the original forward (or, when something has wrapped ours
    since, leaves ours underneath passing everything through). Everything per instance lives in the model's
    ``__dict__``, so ``copy.deepcopy(model)`` (TRL's reference models) gives a copy that runs its own weights; a
    model with the wrapper cannot be pickled whole (``torch.save(model)``; ``save_pretrained`` is unaffected).
    Checked on every call, so a head swapped or partitioned later (DeepSpeed ZeRO-3) falls back to the stock path
    with one warning; a MoE model called with ``output_router_logits`` takes the stock path (its router loss).

Wiring (for the Trainer integration)
------------------------------------
Call ``enable_fused_loss(model)`` once the model is built and injected, before ``Trainer(...)`` wraps it: at the end
of ``inject()`` / ``from_pretrained()`` (it is a no-op returning ``"stock (<reason>)"`` for anything but a supported
causal LM, so it can be called unconditionally), and in ``LowRankCallback.on_init_end`` for models injected
elsewhere (not ``on_train_begin``: by then accelerate has wrapped ``model.forward`` in autocast under
``bf16=True``, and a wrapper installed on top of that would run the fused path outside autocast). Print
``fused_loss_status(model)`` in the training summary (``loss path : fused linear+cross-entropy (chunks of 128
tokens, …)``). TRL 1.16's ``SFTTrainer`` needs no more: it installs its own chunked head
(``trl.trainer.utils.add_fused_lm_head``) on top of whatever forward the model has and calls
``model(..., fused_lm_head=True)``, which computes loss, entropy and token accuracy per chunk without logits
either; that call passes through this wrapper untouched, whichever was installed first (and its label-less calls,
for label smoothing or ``compute_loss_func``, get the stock logits).
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .inject import output_head
from .layers import LoraLinear, SavedModule, dropout_unscaled
from .lm_forward import Plan, forward_plan
from .loss import auto_chunk_size, linear_cross_entropy

logger = logging.getLogger("hf_lowrank")

__all__ = ["disable_fused_loss", "enable_fused_loss", "fused_causal_lm_forward", "fused_loss_status",
           "fused_lm_supported"]

_ATTR = "_hf_lowrank_fused_loss"


# ---- which models can take it --------------------------------------------------------------------------------------


def _decoder(model: nn.Module):
    get = getattr(model, "get_decoder", None)
    dec = None
    try:
        dec = get() if get is not None else None
    except (NotImplementedError, AttributeError, ValueError):
        dec = None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    return dec if isinstance(dec, nn.Module) and dec is not model else None


def _head_parts(head: nn.Module) -> tuple[nn.Module, LoraLinear | None]:
    """(the module whose weight the logits use, the `LoraLinear` around it or None); a `SavedModule` (the head in
    `modules_to_save`: a trained copy beside the original) stands for the module active now."""
    if isinstance(head, SavedModule):
        head = head.active
    return (head.base_layer, head) if isinstance(head, LoraLinear) else (head, None)


def _head_reason(head: nn.Module) -> str | None:
    """None when the head's weight can be used directly, else why not."""
    base, lora = _head_parts(head)
    if lora is not None and lora.lora_magnitude_vector is not None:
        return "the output head has a DoRA adapter"
    if not isinstance(base, nn.Linear):
        return f"the output head is a {type(base).__name__}, not nn.Linear"
    w = getattr(base, "weight", None)
    if w is None or hasattr(w, "quant_state") or not w.is_floating_point() or w.dim() != 2:
        return f"the output head's weight is quantized ({type(base).__name__})"
    return None


def _child_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_children() if m is module), None)


def _router_logits_on(model: nn.Module, kwargs: dict) -> bool:
    value = kwargs.get("output_router_logits")
    return bool(getattr(model.config, "output_router_logits", False) if value is None else value)


def _plan(model: nn.Module) -> Plan | str:
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no config)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    head = output_head(model)
    if head is None:
        return "no output embeddings (get_output_embeddings() is None)"
    reason = _head_reason(head)
    if reason:
        return reason
    decoder = _decoder(model)
    if decoder is None:
        return "no decoder module (get_decoder())"
    decoder_name, head_name = _child_name(model, decoder), _child_name(model, head)
    if decoder_name is None or head_name is None:
        return "the decoder or the head is not a direct child of the model"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers' ForCausalLMLoss is not importable"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return f"the loss is not transformers' ForCausalLMLoss (loss_type={getattr(model, 'loss_type', None)!r})"
    return forward_plan(type(model), decoder_name, head_name)


def fused_lm_supported(model: nn.Module) -> bool | str:
    """True when `model` can take the fused path; otherwise the reason, for a summary line."""
    plan = _plan(model)
    return True if isinstance(plan, Plan) else plan


def _softcap_of(model: nn.Module) -> float | None:
    config = model.config
    value = getattr(config, "final_logit_softcapping", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return value


# ---- the fused causal-LM forward -----------------------------------------------------------------------------------

_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "return_dict", "logits_to_keep")


def fused_causal_lm_forward(model: nn.Module, input_ids=None, attention_mask=None, labels=None,
                            num_items_in_batch=None, *, shift_labels=None, ignore_index: int = -100,
                            chunk_size: int | None = None, softcap: float | None | str = "config",
                            recompute: bool = False, return_dict: bool | None = None, logits_to_keep=0, **kwargs):
    """The decoder, then `linear_cross_entropy` over its last hidden state: a `CausalLMOutputWithPast` whose
    `logits` is None. `softcap="config"` reads `final_logit_softcapping` when the model's forward applies it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None and shift_labels is None:
        raise ValueError("fused_causal_lm_forward needs labels (or shift_labels): it returns a loss, not logits")
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("fused_causal_lm_forward scores every position; logits_to_keep must be 0")
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(f"this model cannot take the fused path: {plan}")
    if plan.router_aux and _router_logits_on(model, kwargs):
        raise ValueError("output_router_logits is on: the model adds its router loss, which the fused path does not")
    if softcap == "config":
        softcap = _softcap_of(model) if plan.softcap_attr else None
    decoder = getattr(model, plan.decoder_name)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    base, lora = _head_parts(getattr(model, plan.head_name))
    weight, bias = _full(base.weight), _full(base.bias)
    if plan.cast_hidden:
        hidden = hidden.to(weight.dtype)
    low_rank = None
    if lora is not None and not lora.disabled and not lora.merged:
        hidden = hidden.to(weight.device)
        # LoraLinear: out + s·(dropout(x)·Aᵀ)·Bᵀ in the activations' dtype, with the layer's own dropout
        x_in, keep = dropout_unscaled(lora.dropout, hidden)
        a = F.linear(x_in, _full(lora.lora_A.weight).to(hidden.dtype))  # (…, H) -> (…, r)
        low_rank = (a * (lora.scaling * keep), _full(lora.lora_B.weight).to(hidden.dtype))
    target = labels if shift_labels is None else shift_labels
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                num_items_in_batch=num_items_in_batch, shift=shift_labels is None, softcap=softcap,
                                chunk_size=chunk_size, low_rank=low_rank, recompute=recompute)
    fields = {f for f in CausalLMOutputWithPast.__dataclass_fields__}
    extra = {}
    for name in ("cache", "past_key_values", "hidden_states", "attentions"):
        if name in fields and getattr(out, name, None) is not None:
            extra[name] = getattr(out, name)
    result = CausalLMOutputWithPast(loss=loss, logits=None, **extra)
    if return_dict is False:  # the stock tuple's positions, (loss, logits, …): to_tuple() would drop the None
        return (loss, None, *result.to_tuple()[1:])
    return result


def _full(t):
    """A DTensor (FSDP2) gathered to a plain tensor; anything else as it is."""
    if t is not None and type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


# ---- the instance-level forward wrapper ----------------------------------------------------------------------------


@dataclass
class _State:
    stock: object  # the forward underneath (a bound method; deepcopy rebinds it to the copy)
    wrapper: object  # our bound method, as installed
    chunk_size: int | None
    recompute: bool
    signature: inspect.Signature
    enabled: bool = True
    warned: bool = False


def _description(model: nn.Module, state: _State) -> str:
    base, _ = _head_parts(output_head(model))
    chunk = state.chunk_size or auto_chunk_size(base.weight.shape[0], base.weight.device)
    recompute = state.recompute or base.weight.dtype == torch.float16  # as `linear_cross_entropy` decides for fp16
    how = "backward recomputes the logits" if recompute else "gradients in the forward"
    return f"fused linear+cross-entropy (chunks of {chunk} tokens, {how}; no logits in training forwards)"


def enable_fused_loss(model: nn.Module, chunk_size: int | None = None, recompute: bool = False) -> str:
    """Route training forwards with labels through the fused path; returns the summary line (see module docstring)."""
    reason = fused_lm_supported(model)
    if reason is not True:
        disable_fused_loss(model)
        return f"stock ({reason})"
    state = model.__dict__.get(_ATTR)
    if state is not None:
        state.chunk_size, state.recompute, state.enabled = chunk_size, recompute, True
        return _description(model, state)
    stock = model.forward
    signature = inspect.signature(stock)

    def forward(self, *args, **kwargs):
        # Everything per instance comes from self's state (not from this closure), so copy.deepcopy(model) gives a
        # copy whose forward runs the copy.
        st = self.__dict__.get(_ATTR)
        if st is None:
            return type(self).forward(self, *args, **kwargs)
        if not st.enabled:
            return st.stock(*args, **kwargs)
        if args:
            try:
                kwargs = _as_kwargs(st.signature, args, kwargs)
            except TypeError:
                return st.stock(*args, **kwargs)
        if (not self.training or kwargs.get("labels") is None or kwargs.get("fused_lm_head")
                or kwargs.get("logits_to_keep") not in (None, 0) or not _fusable_now(self, st, kwargs)):
            return st.stock(**kwargs)
        kwargs.pop("fused_lm_head", None)
        return fused_causal_lm_forward(self, chunk_size=st.chunk_size, recompute=st.recompute, **kwargs)

    # The signature the Trainer (model_accepts_loss_kwargs, unused columns) and generate() inspect: the original's.
    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    forward.__doc__ = getattr(stock, "__doc__", None)
    forward.__name__ = forward.__qualname__ = "forward"
    bound = types.MethodType(forward, model)
    model.__dict__[_ATTR] = _State(stock, bound, chunk_size, recompute, signature)
    model.forward = bound
    return _description(model, model.__dict__[_ATTR])


def fused_loss_status(model: nn.Module) -> str:
    """The summary line for a model as it is now: what `enable_fused_loss` returned, or why the path is stock."""
    state = model.__dict__.get(_ATTR)
    if state is not None and state.enabled:
        return _description(model, state)
    reason = fused_lm_supported(model)
    return "stock (fused loss not enabled)" if reason is True else f"stock ({reason})"


def disable_fused_loss(model: nn.Module) -> None:
    """Back to the stock forward. When something has wrapped ours since (TRL, accelerate), ours stays underneath
    it and passes every call through."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        return
    if model.__dict__.get("forward") is not state.wrapper:
        state.enabled = False
        return
    del model.__dict__[_ATTR]
    if getattr(state.stock, "__self__", None) is model and getattr(state.stock, "__func__", None) is getattr(
            type(model), "forward", None):
        del model.__dict__["forward"]  # the class's own forward again
    else:
        model.forward = state.stock


def _as_kwargs(signature: inspect.Signature, args, kwargs) -> dict:
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("extra positional arguments")
        else:
            out[name] = value
    return out


def _fusable_now(model: nn.Module, st: _State, kwargs: dict) -> bool:
    """Checks that can change after enable_fused_loss: the head (swapped, adapted, partitioned), router losses."""
    plan = _plan(model)
    if isinstance(plan, str):
        _warn_once(st, f"hf_lowrank: {plan}; using the stock loss path")
        return False
    if plan.router_aux and _router_logits_on(model, kwargs):
        return False  # the stock forward adds the router loss
    w = getattr(_head_parts(getattr(model, plan.head_name))[0], "weight", None)
    if hasattr(w, "ds_id") or w.numel() == 0:
        _warn_once(st, "hf_lowrank: the output head is partitioned (DeepSpeed ZeRO-3); using the stock loss path")
        return False
    return True


def _warn_once(st: _State, message: str) -> None:
    if not st.warned:
        st.warned = True
        logger.warning(message)
