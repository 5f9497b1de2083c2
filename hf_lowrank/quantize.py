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
import os

import torch
from torch import nn

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


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launch_kind() -> str | None:
    """"deepspeed", "fsdp", "ddp" or None (one process), from the launcher's environment.

    `accelerate launch` with a DeepSpeed or FSDP config exports ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP;
    a `TrainingArguments(deepspeed=...)` made before loading (under `torchrun` or `deepspeed`) leaves transformers'
    DeepSpeed config alive; any other launch with WORLD_SIZE > 1 is plain data parallel.
    """
    if _truthy("ACCELERATE_USE_DEEPSPEED") or _transformers_deepspeed_config() is not None:
        return "deepspeed"
    if _truthy("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "ddp"
    return None


def _transformers_deepspeed_config() -> dict | None:
    """The DeepSpeed config a live `TrainingArguments(deepspeed=...)` registered with transformers, if any."""
    import sys

    if "transformers" not in sys.modules:
        return None
    from .seams import live_deepspeed_config

    return live_deepspeed_config()


def current_device_map() -> dict[str, int | str] | None:
    """The whole model on this process's device: one device per rank under a distributed launch, never "auto".

    "auto" would spread one model over every visible GPU: under DDP each rank would then hold a model split across
    all GPUs (DDP refuses such modules, or worse, ranks fight for memory). None when a `TrainingArguments` with a
    ZeRO-3 config is alive: transformers then takes the ZeRO-3 init path, places the model itself and refuses any
    `device_map`.
    """
    config = _transformers_deepspeed_config()
    if config is not None and config.get("zero_optimization", {}).get("stage") == 3:
        return None
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        return {"": int(local_rank) if local_rank is not None else torch.cuda.current_device()}
    return {"": "cpu"}


def for_launch(config: LowRankConfig) -> LowRankConfig:
    """`config` adjusted to the launch: under FSDP or DeepSpeed, store the 4-bit codes in the model dtype.

    FSDP and ZeRO-3 shard parameters as flat float buffers (and cast them under mixed precision): uint8 codes cannot
    be sharded with bf16 weights or would be cast. The bits are the same in a bf16 container, so this costs nothing;
    under ZeRO-2 it is harmless. An explicit float `quant_storage` is kept.
    """
    if launch_kind() in ("fsdp", "deepspeed") and config.quantization and config.quant_storage == "uint8":
        return config.replace(quant_storage=config.compute_dtype)
    return config


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze the base and let gradients flow through it, without PEFT's blanket fp32 upcast.

    Norms and embeddings stay in the compute dtype (upcasting them is what makes QLoRA use more memory than bf16
    LoRA). Input embeddings get `requires_grad` outputs so checkpointed blocks still send gradients to adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # see LoraLinear: the packed CPU path drops input gradients
    if hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # transformers' answer for models whose get_input_embeddings is not defined
            logger.warning("%s has no input embeddings to mark as requiring gradients: with reentrant gradient "
                           "checkpointing its adapters may get no gradient (the first training step checks); use "
                           "gradient_checkpointing_kwargs={'use_reentrant': False}", type(model).__name__)
    return model
