"""`hf-lowrank doctor [--config accelerate.yaml]`: the resolved environment, and refusals of known-bad setups.

It prints versions, devices, the bitsandbytes backend, the launch (from `--config`, or from the environment when run
under `accelerate launch` / `torchrun`) and what hf_lowrank will set by itself there; then it runs the checks below
and exits 1 when any of them refuses, printing the reason and the fix.

Each check is a plain function of a `Setup` returning a `Problem` or None, so tests and other tools call them too:

- `check_paged_8bit_fsdp`   paged 8-bit optimizer state cannot be checkpointed under FSDP
- `check_quant_storage`     FSDP and ZeRO-3 need the 4-bit codes stored in the model's float dtype
- `check_device_map`        `device_map="auto"` (a model spread over GPUs) under a multi-process launch
- `check_reentrant`         reentrant gradient checkpointing under DDP ("marked as ready twice")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
MULTI_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Problem:
    """A refused combination: which check, why it fails, and what to do instead."""

    check: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}\n    fix: {self.fix}"


@dataclass
class Setup:
    """The launch and the user's choices that decide whether a multi-process QLoRA run works.

    Args:
        kind: "ddp", "fsdp", "deepspeed" or None (one process).
        num_processes: processes the launch starts.
        zero_stage: DeepSpeed ZeRO stage (None when not DeepSpeed or unknown).
        optim: `TrainingArguments.optim` in force (hf_lowrank's default is paged_adamw_32bit).
        quant_storage: `bnb_4bit_quant_storage` in force (hf_lowrank picks the model dtype under FSDP / DeepSpeed).
        dtype: the model (and compute) dtype.
        device_map: the `device_map` given to from_pretrained (None = hf_lowrank's one device per rank).
        gradient_checkpointing: whether activations are checkpointed.
        use_reentrant: `gradient_checkpointing_kwargs["use_reentrant"]` (None = transformers' default, False).
        source: where the launch was read from, for the printout.
        notes: warnings about the launch itself (not refusals).
    """

    kind: str | None = None
    num_processes: int = 1
    zero_stage: int | None = None
    optim: str = "paged_adamw_32bit"
    quant_storage: str = "uint8"
    dtype: str = "bfloat16"
    device_map: Any = None
    gradient_checkpointing: bool = False
    use_reentrant: bool | None = None
    source: str = "environment"
    notes: list[str] = dataclasses.field(default_factory=list)


# ---- checks -------------------------------------------------------------------------------------------------------


def check_paged_8bit_fsdp(setup: Setup) -> Problem | None:
    """Paged 8-bit optimizer state (bitsandbytes) cannot be checkpointed under FSDP."""
    optim = (setup.optim or "").lower()
    if setup.kind != "fsdp" or not ("paged" in optim and "8bit" in optim):
        return None
    return Problem(
        "paged-8bit-optimizer-with-fsdp",
        f"optim={setup.optim!r} keeps 8-bit quantized, paged optimizer state; FSDP's optimizer state dict reshards "
        "every state tensor as a float shard of its parameter, which that state is not, so saving a checkpoint "
        "fails (and resume with it)",
        "use optim='paged_adamw_32bit' (hf_lowrank's default) or 'adamw_torch'; 8-bit state saves little for LoRA, "
        "whose optimizer state is small")


def check_quant_storage(setup: Setup) -> Problem | None:
    """FSDP and ZeRO-3 shard parameters as float buffers: 4-bit codes must be stored in the model dtype."""
    sharded = setup.kind == "fsdp" or (setup.kind == "deepspeed" and setup.zero_stage == 3)
    if not sharded or setup.quant_storage == setup.dtype:
        return None
    where = "FSDP" if setup.kind == "fsdp" else "DeepSpeed ZeRO-3"
    if setup.quant_storage not in FLOAT_DTYPES:
        reason = (f"bnb_4bit_quant_storage={setup.quant_storage!r} is not a float dtype; {where} flattens and casts "
                  f"parameters as {setup.dtype} buffers, so the packed 4-bit codes would be refused or corrupted")
    else:
        reason = (f"bnb_4bit_quant_storage={setup.quant_storage!r} differs from the model dtype {setup.dtype!r}; "
                  f"{where} needs one float dtype across the parameters it shards")
    return Problem("quant-storage-not-model-dtype", reason,
                   f"leave quant_storage unset (hf_lowrank stores the codes as {setup.dtype} under this launch) or "
                   f"pass LowRankConfig(quant_storage={setup.dtype!r}) / "
                   f"BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{setup.dtype})")


def check_device_map(setup: Setup) -> Problem | None:
    """Under a multi-process launch each rank holds its model on one device; "auto" spreads it over all GPUs."""
    if setup.kind is None or setup.device_map is None:
        return None
    dm = setup.device_map
    if isinstance(dm, str) and dm in MULTI_DEVICE_MAPS:
        spread = True
    elif isinstance(dm, dict):
        spread = len({str(v) for v in dm.values()}) > 1
    else:
        spread = False
    if not spread:
        return None
    return Problem(
        "device-map-auto-under-ddp",
        f"device_map={dm!r} spreads one copy of the model over several devices in every rank; under "
        f"{setup.kind.upper()} each rank must own one device (DDP refuses multi-device modules; ranks also collide "
        "on GPU 0)",
        "drop device_map: hf_lowrank loads each rank's model on its own device (device_map={'': local_rank}); "
        "or pass device_map={'': int(os.environ['LOCAL_RANK'])}")


def check_reentrant(setup: Setup) -> Problem | None:
    """Reentrant checkpointing re-runs the forward inside backward: DDP then sees LoRA parameters ready twice."""
    if setup.kind != "ddp" or not setup.gradient_checkpointing or setup.use_reentrant is not True:
        return None
    return Problem(
        "reentrant-checkpointing-under-ddp",
        "gradient_checkpointing_kwargs={'use_reentrant': True} re-runs each block's forward inside backward; as soon "
        "as DDP looks for unused parameters (ddp_find_unused_parameters=True, which models with unused branches "
        "need) every step fails with 'Expected to mark a variable ready only once'",
        "use gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' and hf_lowrank's default)")


CHECKS: tuple[Callable[[Setup], Problem | None], ...] = (
    check_paged_8bit_fsdp, check_quant_storage, check_device_map, check_reentrant)


def problems(setup: Setup) -> list[Problem]:
    """Every refusal for `setup` (empty: nothing known-bad)."""
    return [p for check in CHECKS if (p := check(setup)) is not None]


# ---- resolving the launch -----------------------------------------------------------------------------------------


def setup_from_accelerate_config(path: str | os.PathLike) -> Setup:
    """The launch an accelerate YAML (or JSON) config describes, read with accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.fspath(path))
    dtype = getattr(cfg.distributed_type, "value", str(cfg.distributed_type))
    setup = Setup(num_processes=int(cfg.num_processes or 1), source=os.fspath(path))
    if dtype == "DEEPSPEED":
        setup.kind = "deepspeed"
        ds = dict(cfg.deepspeed_config or {})
        setup.zero_stage = _zero_stage(ds, Path(path))
    elif dtype == "FSDP":
        setup.kind = "fsdp"
        fsdp = dict(cfg.fsdp_config or {})
        setup.gradient_checkpointing = bool(fsdp.get("fsdp_activation_checkpointing", False))
        if cfg.use_cpu or not _has_gpu():
            setup.notes.append("FSDP without GPUs: accelerate's FSDP plugin does not shard on CPU (it errors, or "
                               "with TrainingArguments(use_cpu=True) silently runs DDP); FSDP needs GPUs")
    elif setup.num_processes > 1 or dtype.startswith("MULTI_"):
        setup.kind = "ddp"
        if dtype == "MULTI_CPU" and not cfg.mpirun_config:
            setup.notes.append("MULTI_CPU: without mpirun, `accelerate launch` may run ONE process on a machine "
                               "without GPUs; use --multi_gpu --num_processes N with TrainingArguments(use_cpu=True)")
    return setup


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _zero_stage(ds: dict[str, Any], config_path: Path) -> int | None:
    if "zero_stage" in ds:
        return int(ds["zero_stage"])
    file = ds.get("deepspeed_config_file")
    if not file:
        return None
    return zero_stage_of(_find(file, config_path))


def zero_stage_of(path: str | os.PathLike) -> int | None:
    """`zero_optimization.stage` of a DeepSpeed JSON (None when absent or "auto")."""
    with open(path) as f:
        stage = json.load(f).get("zero_optimization", {}).get("stage")
    return int(stage) if isinstance(stage, int) else None


def _find(file: str, config_path: Path) -> Path:
    """A config-relative file: tried from the working directory, then beside the config and its parents."""
    candidates = [Path(file)] + [parent / file for parent in config_path.resolve().parents]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"deepspeed_config_file {file!r} named in {config_path} was not found from "
                            f"{os.getcwd()} nor beside the config; run from the folder it is relative to "
                            "(the repository root for integrations/) or make the path absolute")


def setup_from_environment() -> Setup:
    """The launch of the current process, from what `accelerate launch` / `torchrun` exported."""
    from .compat import live_deepspeed_config
    from .launch import launch_kind

    setup = Setup(kind=launch_kind(), num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    if setup.kind == "deepspeed":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if file and file != "none" and os.path.isfile(file):
            setup.zero_stage = zero_stage_of(file)
        elif stage:
            setup.zero_stage = int(stage)
        else:
            config = live_deepspeed_config() or {}
            stage = config.get("zero_optimization", {}).get("stage")
            setup.zero_stage = stage if isinstance(stage, int) else None
    return setup


def resolve(args: argparse.Namespace) -> Setup:
    """The `Setup` doctor judges: the launch, then hf_lowrank's own choices, then the user's explicit ones."""
    from .config import LowRankConfig
    from .launch import for_launch

    setup = setup_from_accelerate_config(args.config) if args.config else setup_from_environment()
    if args.deepspeed:
        setup.kind, setup.zero_stage = "deepspeed", zero_stage_of(args.deepspeed)
    if args.num_processes:
        setup.num_processes = args.num_processes
    setup.dtype = args.dtype
    storage = args.quant_storage
    if storage is None:  # what hf_lowrank picks under this launch
        storage = _storage_for(setup.kind, LowRankConfig(compute_dtype=args.dtype), for_launch)
    setup.quant_storage = storage
    setup.optim = args.optim
    setup.device_map = _parse_device_map(args.device_map)
    setup.gradient_checkpointing = setup.gradient_checkpointing or args.gradient_checkpointing
    setup.use_reentrant = args.use_reentrant
    return setup


def _storage_for(kind: str | None, config, for_launch) -> str:
    env = {"deepspeed": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}.get(kind or "")
    if env is None:
        return config.quant_storage
    old = os.environ.get(env)
    os.environ[env] = "true"
    try:
        return for_launch(config).quant_storage
    finally:
        if old is None:
            del os.environ[env]
        else:
            os.environ[env] = old


def _parse_device_map(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ---- the environment printout ---------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def bitsandbytes_backend() -> str:
    """bitsandbytes' native backend ("CUDA", "ROCm", "XPU", "CPU", ...) or why it is unavailable."""
    try:
        from bitsandbytes import cextension
    except Exception as e:  # an install that fails to import is exactly what doctor must report
        return f"unavailable ({type(e).__name__}: {e})"
    return str(getattr(cextension, "BNB_BACKEND", "unknown"))


def devices() -> list[str]:
    import torch

    out = [f"cpu: {os.cpu_count()} cores"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
            out.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {bf16}")
    else:
        out.append("cuda: none")
    return out


def environment_report(setup: Setup) -> str:
    """The resolved environment as printed by `hf-lowrank doctor`."""
    from .version import __version__

    dist_vars = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                 if k in os.environ}
    accel_vars = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("ACCELERATE_", "FSDP_"))}
    launch = setup.kind.upper() if setup.kind else "single process"
    if setup.kind == "deepspeed":
        launch += f" ZeRO-{setup.zero_stage if setup.zero_stage is not None else '?'}"
    per_rank = "{'': local_rank}" if setup.kind else "{'': 0} (or cpu)"
    lines = [
        "hf-lowrank doctor",
        f"  hf_lowrank     {__version__}",
        f"  python         {platform.python_version()} ({sys.executable})",
        f"  torch          {_version('torch')}",
        f"  transformers   {_version('transformers')}",
        f"  accelerate     {_version('accelerate')}",
        f"  bitsandbytes   {_version('bitsandbytes')} (backend: {bitsandbytes_backend()})",
        f"  deepspeed      {_version('deepspeed')}",
        "  devices        " + "; ".join(devices()),
        f"  launch         {launch}, {setup.num_processes} process(es), from {setup.source}",
        f"  process env    {dist_vars or 'none (not launched)'}",
        f"  accelerate env {accel_vars or 'none'}",
        "  in force (hf_lowrank's choice unless given on the command line)",
        f"    device_map   {setup.device_map if setup.device_map is not None else per_rank} (hf_lowrank: one "
        "device per rank, never 'auto' under a multi-process launch)",
        f"    quant store  {setup.quant_storage} (hf_lowrank: the model dtype under FSDP / DeepSpeed, uint8 otherwise)",
        f"    optim        {setup.optim} (hf_lowrank: paged_adamw_32bit when TrainingArguments.optim is left at its "
        "default)",
        f"    checkpoint   {'on' if setup.gradient_checkpointing else 'off'}, use_reentrant={setup.use_reentrant} "
        "(None = transformers' default, non-reentrant)",
    ]
    lines += [f"  note: {n}" for n in setup.notes]
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-lowrank doctor",
        description="Print the resolved environment and refuse known-bad multi-process setups (exit 1).")
    p.add_argument("--config", help="an accelerate config (e.g. integrations/accelerate/fsdp_qlora.yaml); default: "
                                    "the launch this process runs under")
    p.add_argument("--deepspeed", help="a DeepSpeed JSON, as in TrainingArguments(deepspeed=...)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--optim", default="paged_adamw_32bit", help="TrainingArguments.optim (default: hf_lowrank's)")
    p.add_argument("--quant-storage", default=None, choices=("uint8", *FLOAT_DTYPES),
                   help="bnb_4bit_quant_storage you set yourself (default: what hf_lowrank picks for the launch)")
    p.add_argument("--dtype", default="bfloat16", choices=FLOAT_DTYPES, help="the model / compute dtype")
    p.add_argument("--device-map", default=None, help='device_map you pass to from_pretrained ("auto" or JSON)')
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--use-reentrant", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient_checkpointing_kwargs['use_reentrant']")
    return p


def doctor_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank doctor`: 0 when nothing known-bad was found, 1 with reasons and fixes otherwise, 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        setup = resolve(args)
    except (OSError, ValueError) as e:
        print(f"hf-lowrank doctor: {e}", file=sys.stderr)
        return 2
    print(environment_report(setup))
    print("checks")
    found = []
    for check in CHECKS:
        problem = check(setup)
        found += [problem] if problem else []
        print(f"  {'REFUSED' if problem else 'ok':<8} {check.__doc__.splitlines()[0]}")
    if not found:
        print("no known-bad combination found")
        return 0
    print(f"\n{len(found)} known-bad combination(s):", file=sys.stderr)
    for p in found:
        print(f"  {p}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(doctor_main())
