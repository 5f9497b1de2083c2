"""Loading the frozen base in 4 bits, and getting a k-bit model ready to train adapters.

    16-bit weight W (out×in) ──split into blocks of 64──► per block: absmax c, W/c ∈ [-1, 1]
        │                                                        │
        │  NF4: each value → nearest of 16 levels that are the   │  double quantization: the fp32 absmax
        │  quantiles of N(0, 1), so a normally distributed       │  constants are themselves quantized to
        │  weight uses all 16 levels equally (4 bits/value)      │  8 bits in blocks of 256 (≈0.127 bits/param
        ▼                                                        ▼  instead of 0.5)
    packed 4-bit codes, stored in `quant_storage` (uint8 by default: two codes a byte; FSDP / ZeRO-3 need the model
    dtype so every parameter of a shard has one float dtype)
        │
        ▼  at each matmul: dequantize block by block to `compute_dtype` (bf16), then x·Wᵀ in bf16.

So the frozen weights cost ≈4.127 bits a parameter at rest and are 16-bit only transiently, one layer at a time;
the adapters, their gradients and their optimizer state are the only full-precision training state.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .compat import shield_cpu_repack
from .config import LowRankConfig
from .inject import HEAD_NAMES

logger = logging.getLogger("hf_lowrank")


def bnb_config(config: LowRankConfig, skip_modules: list[str] | None = None):
    """transformers' `BitsAndBytesConfig` for `config` (4-bit, NF4 / FP4, double quant, compute and storage dtype).

    Output heads and `modules_to_save` stay unquantized: a 4-bit classification head could not be trained.
    """
    from transformers import BitsAndBytesConfig

    if config.quantization is None:
        raise ValueError("LowRankConfig.quantization is None: no BitsAndBytesConfig for an unquantized base.")
    skip = list(dict.fromkeys([*HEAD_NAMES, *(config.modules_to_save or []), *(skip_modules or [])]))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, config.quant_storage),
        llm_int8_skip_modules=skip,
    )


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze the base and let gradients flow through it, without PEFT's blanket fp32 upcast.

    Norms and embeddings stay in the compute dtype (upcasting them is what makes QLoRA use more memory than bf16
    LoRA). Input embeddings get `requires_grad` outputs so checkpointed blocks still send gradients to adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        shield_cpu_repack(module)  # the packed CPU path drops input gradients (hf_lowrank.compat)
    if hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # transformers' answer for models whose get_input_embeddings is not defined
            logger.warning("%s has no input embeddings to mark as requiring gradients: with reentrant gradient "
                           "checkpointing its adapters may get no gradient (the first training step checks); use "
                           "gradient_checkpointing_kwargs={'use_reentrant': False}", type(model).__name__)
    return model


def nf4_roundtrip(w: torch.Tensor, config: LowRankConfig) -> torch.Tensor:
    """What a 4-bit layer holds for the dense weight `w` (out, in), as float32: cast to the compute dtype,
    quantized as bitsandbytes' `Linear4bit` does on load (blocks of 64, `config`'s type and double quant), and
    dequantized."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.to(getattr(torch, config.compute_dtype)).contiguous(), blocksize=64,
                                  compress_statistics=config.double_quant, quant_type=config.quantization,
                                  quant_storage=getattr(torch, config.quant_storage))
    return bnbf.dequantize_4bit(q, state).float()
