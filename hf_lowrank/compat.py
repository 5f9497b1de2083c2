"""Every read of another library's private API, and the one workaround for a bug in a dependency.

Patches that *replace* foreign code live in `hf_lowrank.integrations` (a registry that can be undone); this module
only reads or sets what those libraries do not make public, one small function each, so a change upstream breaks
in one named place. Each entry says what it touches, why no public API does, and which test fails when it moves.

- `from_config`         transformers `PreTrainedModel._from_config`: builds a model of a concrete class from a config
                        in a given dtype (the public `from_config` exists only on the Auto classes). Used by the
                        in-memory merge. Test: tests/test_inject.py (merge round trips).
- `quantized_modules`   transformers `AutoHfQuantizer.preprocess_model`: which layers `from_pretrained` stores in 4
                        bits (its skip list: heads, tied weights, `llm_int8_skip_modules`). Used by the shard-by-shard
                        merge. Test: tests/test_export.py.
- `live_deepspeed_config` transformers' weakly referenced DeepSpeed config of a live `TrainingArguments(deepspeed=...)`.
                        Decides the device map (none under ZeRO-3) and the 4-bit storage dtype. Test:
                        tests/test_distributed.py.
- `saved_tensors_hooks` torch's `_top_saved_tensors_default_hooks`: the (pack, unpack) pair of the innermost
                        `torch.autograd.graph.saved_tensors_hooks` (gradient checkpointing's), so that
                        `lora_ops.lora_linear` can pack its tensors before its base layer runs (`save_for_backward`
                        packs only when the forward returns; no public getter exists). Missing: None, tensors saved
                        the usual way. Test: tests/test_lora_ops.py (the recompute stops before the last base matmul).
- `graph_kept`          torch's `_get_current_graph_task_keep_graph`: whether the running backward keeps the graph
                        (`retain_graph`), so that `lora_linear` frees the tensors it packed itself as autograd frees
                        saved ones. Missing: True (kept until the graph goes). Test: tests/test_lora_ops.py (packed
                        tensors freed by the backward; a second backward refused).
- `native_half_matmul`  torch's `torch.ops.mkldnn._is_mkldnn_bf16_supported` / `_fp16_`: whether oneDNN multiplies
                        bf16 / fp16 matrices on this CPU (the check torch itself makes before sending a bf16 matmul
                        to oneDNN: AVX-512 core or newer on x86, for fp16 avx512_fp16 or AMX). Without it torch's
                        fallback kernel runs them 30–60× slower than fp32 (an AVX2-only EPYC: 1.8 against 66
                        GFLOP/s), so `lora_ops` computes the rank-r products in fp32 there. Missing: True (the
                        activations' dtype, as before). Test: tests/test_lora_ops.py (both choices: the formula).
- `shield_cpu_repack`   a bitsandbytes bug (below), version-gated.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn


def from_config(model_cls, config, dtype):
    """`model_cls` built from `config` with its weights in `dtype` (transformers' `_from_config`)."""
    return model_cls._from_config(config, dtype=dtype)


def quantized_modules(model: nn.Module, quantization_config) -> set[str]:
    """Names of the modules that `from_pretrained(..., quantization_config=...)` turns into `Linear4bit`, decided by
    transformers' own quantizer on `model`, a meta-device copy that this call changes."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return {name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}


def live_deepspeed_config() -> dict | None:
    """The DeepSpeed config dict a live `TrainingArguments(deepspeed=...)` registered with transformers, or None.
    Never imports transformers: with it not imported, no such config can exist."""
    if "transformers" not in sys.modules:
        return None
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config()


def saved_tensors_hooks():
    """(pack, unpack) of the innermost saved-tensor hooks in effect, or None when there are none (or they are
    disabled, or this torch lacks the getter): what autograd itself calls for a tensor saved now."""
    autograd = torch._C._autograd
    try:
        if not autograd._saved_tensors_hooks_is_enabled():
            return None
        return autograd._top_saved_tensors_default_hooks(False)
    except AttributeError:
        return None


def graph_kept() -> bool:
    """Whether the backward running now keeps the graph (`retain_graph`, which defaults to `create_graph`)."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except AttributeError:
        return True


@functools.cache
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 or fp16) matrices natively through oneDNN (True for other dtypes,
    and when this torch cannot tell)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return probe is None or (torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, probe)()))
    except (AttributeError, RuntimeError):
        return True


# ---- bitsandbytes: the packed CPU path ----------------------------------------------------------------------------
#
# On CPUs with avx512_bf16, bitsandbytes' `Linear4bit` repacks its weight in place on the first eval-mode forward
# without grad. After that, `matmul_4bit` no longer propagates gradients to its input (adapters upstream silently
# stop training), and layers whose out_features is not a multiple of 32 crash. The layer's own opt-out flag keeps it
# off that path. Test: tests/test_layers.py (an eval forward mid-training changes no gradient; odd widths evaluate).

#: the attribute bitsandbytes reads to decide whether to repack (present from 0.45 on).
_REPACK_FLAG = "support_avx512bf16_for_cpu"
#: the first bitsandbytes release that fixes the bug; None while no release does (checked up to 0.50.2).
BNB_REPACK_FIXED_IN: tuple[int, ...] | None = None


def _bnb_version() -> tuple[int, ...]:
    import bitsandbytes

    return tuple(int(p) for p in bitsandbytes.__version__.split(".")[:3] if p.isdigit())


def cpu_repack_shield_needed() -> bool:
    """Whether the installed bitsandbytes has the bug (every release with the flag, until one fixes it)."""
    return BNB_REPACK_FIXED_IN is None or _bnb_version() < BNB_REPACK_FIXED_IN


def shield_cpu_repack(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer off the packed CPU path (a no-op for other modules and fixed releases)."""
    if hasattr(module, _REPACK_FLAG) and cpu_repack_shield_needed():
        setattr(module, _REPACK_FLAG, False)
