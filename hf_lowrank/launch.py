"""Which launch this process is part of, and what that means for loading a 4-bit model.

    one process          device_map {"": "cpu"} or the current GPU
    DDP                  one device per rank ({"": LOCAL_RANK}), never "auto" (DDP refuses a model spread over GPUs)
    FSDP / DeepSpeed     4-bit codes stored in the model's float dtype so they shard; under ZeRO-3 no device map
                         at all (transformers takes the ZeRO-3 init path and places the model itself)
"""

from __future__ import annotations

import os

import torch

from .compat import live_deepspeed_config
from .config import LowRankConfig


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launch_kind() -> str | None:
    """"deepspeed", "fsdp", "ddp" or None (one process), from the launcher's environment.

    `accelerate launch` with a DeepSpeed or FSDP config exports ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP;
    a `TrainingArguments(deepspeed=...)` made before loading (under `torchrun` or `deepspeed`) leaves transformers'
    DeepSpeed config alive; any other launch with WORLD_SIZE > 1 is plain data parallel.
    """
    if _truthy("ACCELERATE_USE_DEEPSPEED") or live_deepspeed_config() is not None:
        return "deepspeed"
    if _truthy("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "ddp"
    return None


def current_device_map() -> dict[str, int | str] | None:
    """The whole model on this process's device: one device per rank under a distributed launch, never "auto".

    "auto" would spread one model over every visible GPU: under DDP each rank would then hold a model split across
    all GPUs (DDP refuses such modules, or worse, ranks fight for memory). None when a `TrainingArguments` with a
    ZeRO-3 config is alive: transformers then takes the ZeRO-3 init path, places the model itself and refuses any
    `device_map`.
    """
    config = live_deepspeed_config()
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
