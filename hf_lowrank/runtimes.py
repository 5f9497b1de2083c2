"""Serving runtimes: what each one reads, a verdict per runtime (`hf-lowrank inspect`), an export for each
(`hf-lowrank export --target peft|vllm|llama.cpp`).

    adapter folder ─► verdicts(files) ─► {runtime: Verdict(accepted | needs export | refused, reason, fix)}
                  └─► export(files, target, output)
                        peft       PEFT's format, one r, lora_alpha = r, no rsLoRA, no patterns: every module's
                                   scaling s folded into its B (B' = s·B, A and B zero-padded to the largest rank)
                        vllm       the folder as it is, once vLLM's rules pass (vLLM applies rsLoRA and patterns)
                        llama.cpp  a GGUF LoRA file for the Llama architecture: B' = (s·r / α)·B, so that
                                   llama.cpp's α/r (one α, each pair's own r) gives back s; q/k rows in GGUF order

A runtime's rules are one `Runtime` row of `RUNTIMES`; `verdicts` reads only those rows. What the rows say was
measured, and is kept true by tests/test_serving.py, which starts both engines on CPU (vLLM 0.32, llama.cpp through
llama-cpp-python 0.3.36) with adapters hf_lowrank trained on an NF4 base:
- vLLM applies rsLoRA, rank_pattern and alpha_pattern as PEFT does; it refuses modules_to_save (but `classifier` /
  `score` of classification models), DoRA, biases and a rank above the `max_lora_rank` it was started with, which
  must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512. A refused adapter kills the engine for every later request.
  It serves LoRA only for architectures whose model class supports it (`VLLM_WITHOUT_LORA` lists those that do
  not, GPT-2 and BERT among them; read from vLLM's registry, not run here).
- llama.cpp reads one `adapter.lora.alpha` and scales each A/B pair by α/r with that pair's own r: rank_pattern
  alone is right, rsLoRA and alpha_pattern are silently wrong unless folded into B. Its converter
  (convert_lora_to_gguf.py) refuses full tensors (modules_to_save, e.g. lm_head) and DoRA.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .format import (
    ARCHITECTURE,
    CHECKSUM,
    CONFIG_CHECKSUM,
    LEGACY_CRC32,
    PREFIX,
    VERSION,
    WEIGHTS_NAME,
    AdapterError,
    recorded_quantization,
)
from .loading import read
from .lora_gguf import GGUF_ARCHITECTURES, base_config, gguf_path, write_gguf
from .state import AdapterFiles, write_adapter_files

ACCEPTED, NEEDS_EXPORT, REFUSED = "accepted", "needs export", "refused"
#: vLLM's `max_lora_rank` must be one of these (vllm.config.lora.MaxLoRARanks, 0.32).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: architectures vLLM 0.32 serves without LoRA: every causal-LM / classification / masked-LM architecture in its
#: model registry whose class fails `vllm.model_executor.models.interfaces.supports_lora`.
_WITHOUT_LORA = """
    BailingMoeV2_5ForCausalLM BailingMoeV3ForCausalLM BertForMaskedLM BertForSequenceClassification
    BertForTokenClassification BloomForCausalLM Cohere2MoeForCausalLM DFlashLagunaForCausalLM DbrxForCausalLM
    DeepseekV41ForCausalLM DeepseekV4ForCausalLM DeepseekVLV2ForCausalLM FalconForCausalLM
    FalconMambaForCausalLM GPT2ForSequenceClassification GPT2LMHeadModel GPTJForCausalLM Gemma3nForCausalLM
    GteNewForSequenceClassification HrmTextForCausalLM IQuestLoopCoderForCausalLM KimiLinearForCausalLM
    Mamba2ForCausalLM MambaForCausalLM MiMoV2FlashForCausalLM MiMoV2ForCausalLM
    ModernBertForSequenceClassification ModernBertForTokenClassification Moondream3ForCausalLM
    MoonshotKimiaForCausalLM OpenAIPrivacyFilterForTokenClassification OrionForCausalLM Ovis2_6ForCausalLM
    Ovis2_6_MoeForCausalLM Phi3VForCausalLM RobertaForTokenClassification StableLmForCausalLM Step1ForCausalLM
    Step3TextForCausalLM Step3p5ForCausalLM XLMRobertaForTokenClassification Zamba2ForCausalLM
"""
VLLM_WITHOUT_LORA = frozenset(_WITHOUT_LORA.split())
MERGE_FIX = "merge instead: hf-lowrank merge ADAPTER --output DIR, then serve the merged model"


@dataclass(frozen=True)
class Runtime:
    """One runtime's rules for adapters in PEFT's format."""

    name: str  #: as `inspect` prints it
    target: str  #: `hf-lowrank export --target`
    scaling: str  #: "as configured" (α/r or α/√r, per-module patterns) or "alpha / rank" (one α, each pair's r)
    saved_modules: tuple[str, ...] | None  #: modules_to_save it loads (classification tasks only); None: any
    dora: bool  #: reads DoRA's magnitude vectors
    max_ranks: tuple[int, ...] | None  #: the values its largest-rank setting allows; None: any rank
    without_lora: frozenset[str]  #: architectures it serves no LoRA for
    how: str  #: what serving an accepted adapter takes


RUNTIMES = (
    Runtime("PEFT", "peft", "as configured", None, True, None, frozenset(),
            "PEFT and transformers' model.load_adapter read the folder as it is"),
    Runtime("vLLM", "vllm", "as configured", ("classifier", "score"), False, VLLM_MAX_LORA_RANKS, VLLM_WITHOUT_LORA,
            "LLM(model=BASE, enable_lora=True, max_lora_rank={max_rank}) and LoRARequest(name, id, ADAPTER_DIR)"),
    Runtime("llama.cpp", "llama.cpp", "alpha / rank", (), False, None, frozenset(),
            "hf-lowrank export ADAPTER --target llama.cpp --output FILE.gguf (or llama.cpp's "
            "convert_lora_to_gguf.py), then Llama(model_path=BASE.gguf, lora_path=FILE.gguf)"),
)
BY_TARGET = {rt.target: rt for rt in RUNTIMES}


@dataclass(frozen=True)
class Verdict:
    status: str  #: ACCEPTED, NEEDS_EXPORT or REFUSED
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.status:<12}  {self.reason}" + (f" → {self.fix}" if self.fix else "")


def declared_max_rank(files: AdapterFiles) -> int:
    """The largest rank the config declares (r and rank_pattern's values), which is what vLLM checks."""
    pattern = files.peft_config.get("rank_pattern") or {}
    return max([int(files.peft_config.get("r") or files.config.r), *(int(v) for v in pattern.values())])


def _unsupported(rt: Runtime, files: AdapterFiles) -> str | None:
    """The first adapter feature `rt` cannot apply at all, as a sentence; None when there is none."""
    pc = files.peft_config
    if pc.get("use_dora") and not rt.dora:
        return "DoRA (use_dora=true) is not implemented"
    if rt.target == "peft":
        return None
    if pc.get("trainable_token_indices"):
        return "trainable token rows (trainable_token_indices) are not read"
    if pc.get("bias", "none") != "none" or pc.get("lora_bias"):
        return f"LoRA biases (bias={pc.get('bias')!r}) are not applied"
    for key, what in (("layer_replication", "layer_replication"), ("alora_invocation_tokens", "activated LoRA"),
                      ("use_qalora", "QALoRA"), ("use_bdlora", "block-diagonal LoRA")):
        if pc.get(key):
            return f"{what} is not implemented"
    init = pc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        return f"init_lora_weights={init!r} changes the base weights, which the runtime does not"
    saved = list(pc.get("modules_to_save") or []) + sorted({k.rsplit(".", 1)[0] for k in files.saved_tensors()})
    saved = list(dict.fromkeys(saved))
    if saved and rt.saved_modules is not None:
        allowed = set(rt.saved_modules) if pc.get("task_type") == "SEQ_CLS" else set()
        extra = [m for m in saved if m.rsplit(".", 1)[-1] not in allowed and m not in allowed]
        if extra:
            return (f"full copies of modules (modules_to_save: {', '.join(extra)}) are refused"
                    + (f" (only {' / '.join(rt.saved_modules)} of classification models)" if rt.saved_modules else ""))
    return None


def _wrong_scalings(rt: Runtime, files: AdapterFiles) -> list[str]:
    """Modules whose scaling `rt` would compute differently from the adapter's own."""
    if rt.scaling == "as configured":
        return []
    alpha = float(files.config.lora_alpha)
    return [m for m, (r, s) in files.scalings().items() if not math.isclose(s, alpha / r, rel_tol=1e-6)]


_TASK_SUFFIX = {"CAUSAL_LM": "ForCausalLM", "SEQ_CLS": "ForSequenceClassification",
                "TOKEN_CLS": "ForTokenClassification"}


def _architecture(files: AdapterFiles) -> str | None:
    """The base architecture hf_lowrank recorded when it saved the adapter (None for other tools' files)."""
    recorded = files.metadata.get(ARCHITECTURE, "")
    return recorded.split(",")[0] or None


def served_architecture(files: AdapterFiles) -> str | None:
    """The architecture a runtime builds for the adapter's task: a bare base ("BertModel") trained for
    classification is served as "BertForSequenceClassification"."""
    arch = _architecture(files)
    suffix = _TASK_SUFFIX.get(files.peft_config.get("task_type") or "")
    if arch and suffix and arch.endswith("Model") and not arch.endswith("LMHeadModel"):
        return arch.removesuffix("Model") + suffix
    return arch


def smallest_rank_setting(rank: int, allowed: tuple[int, ...]) -> int | None:
    return next((v for v in allowed if v >= rank), None)


def verdict(rt: Runtime, files: AdapterFiles, max_lora_rank: int | None = None) -> Verdict:
    """What `rt` does with `files` as they are; `max_lora_rank`: the setting a vLLM server was started with."""
    missing = _unsupported(rt, files)
    if missing:
        fix = MERGE_FIX
        return Verdict(REFUSED, f"{rt.name}: {missing}", fix)
    arch = served_architecture(files)
    if arch in rt.without_lora:
        return Verdict(REFUSED, f"{rt.name} serves no LoRA adapters for {arch}", MERGE_FIX)
    if rt.max_ranks is not None:
        rank = declared_max_rank(files)
        setting = smallest_rank_setting(rank, rt.max_ranks)
        if setting is None:
            return Verdict(REFUSED, f"rank {rank} is above the largest max_lora_rank {rt.name} allows "
                           f"({rt.max_ranks[-1]})", MERGE_FIX)
        if max_lora_rank is not None and rank > max_lora_rank:
            return Verdict(REFUSED, f"rank {rank} is above max_lora_rank={max_lora_rank} (a refused adapter stops "
                           "the engine for every request)", f"start {rt.name} with max_lora_rank={setting}")
    ours = rt.target != "llama.cpp" or _architecture(files) in (None, *GGUF_ARCHITECTURES)
    wrong = _wrong_scalings(rt, files)
    if wrong:
        cause = ("rsLoRA's α/√r" if files.config.use_rslora else "alpha_pattern's per-module α")
        fix = (f"hf-lowrank export ADAPTER --target {rt.target} --output OUT (folds each scaling into B)" if ours
               else "hf-lowrank export ADAPTER --target peft --output OUT (folds each scaling into B), then "
               "llama.cpp's convert_lora_to_gguf.py OUT")
        return Verdict(NEEDS_EXPORT, f"{rt.name} applies one lora_alpha / rank to every module: {cause} would be "
                       f"computed wrong, silently ({len(wrong)} of {len(files.scalings())} modules)", fix)
    how = rt.how if ours else "llama.cpp's convert_lora_to_gguf.py (hf-lowrank's GGUF export is for Llama bases)"
    if rt.max_ranks is not None:
        how = how.format(max_rank=max_lora_rank or smallest_rank_setting(declared_max_rank(files), rt.max_ranks))
    return Verdict(ACCEPTED, how)


def verdicts(files: AdapterFiles, max_lora_rank: int | None = None) -> dict[str, Verdict]:
    """{runtime name: Verdict} for every runtime of `RUNTIMES`."""
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        setting = smallest_rank_setting(max_lora_rank, VLLM_MAX_LORA_RANKS)
        raise AdapterError(f"max_lora_rank={max_lora_rank} is not a value vLLM accepts "
                           f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))})"
                           + (f"; the next one up is {setting}" if setting else ""))
    return {rt.name: verdict(rt, files, max_lora_rank) for rt in RUNTIMES}


# ---- describing -----------------------------------------------------------------------------------------------------


def describe(files: AdapterFiles, max_lora_rank: int | None = None) -> str:
    pc, meta = files.peft_config, files.metadata
    scalings = files.scalings()
    ranks = sorted({r for r, _ in scalings.values()})
    n_params = sum(t.numel() for t in files.tensors.values())
    tensor_bytes = sum(t.numel() * t.element_size() for t in files.tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in files.tensors.values()})
    targets = pc.get("target_modules")
    try:
        quant = recorded_quantization(meta)
    except ValueError as e:
        raise AdapterError(f"{files.weights_path}: header entry {e}") from None
    lines = [
        f"adapter         {files.folder}",
        f"written by      {'hf_lowrank ' + meta[VERSION] if files.written_by_us else 'another tool (PEFT?)'}",
        f"base model      {files.base_model or 'unknown'}"
        + (f" @ {files.base_revision}" if files.base_revision else ""),
        f"quantization    {_quant(quant)}",
        f"task            {pc.get('task_type')}",
        f"r / lora_alpha  {pc.get('r')} / {pc.get('lora_alpha')}"
        + ("  (rsLoRA: scaling α/√r)" if pc.get("use_rslora") else "  (scaling α/r)"),
        f"ranks used      {', '.join(map(str, ranks))}",
        f"rank_pattern    {pc.get('rank_pattern') or '-'}",
        f"alpha_pattern   {pc.get('alpha_pattern') or '-'}",
        f"targets         {', '.join(targets) if isinstance(targets, list) else targets}"
        f"  ({len(scalings)} modules)",
        f"modules_to_save {', '.join(pc.get('modules_to_save') or []) or '-'}",
        f"trained tokens  {pc.get('trainable_token_indices') or '-'}",
        f"parameters      {n_params:,} ({', '.join(dtypes)})",
        f"bytes           {tensor_bytes:,} in tensors; {files.weights_path.stat().st_size:,} on disk",
        "runtimes" + (f" (vLLM started with max_lora_rank={max_lora_rank})" if max_lora_rank else "") + ":",
    ]
    lines += [f"  {name:<10} {v}" for name, v in verdicts(files, max_lora_rank).items()]
    return "\n".join(lines)


def _quant(q: dict[str, Any] | None) -> str:
    if q is None:
        return "not recorded (a 16-bit base unless you know otherwise)"
    if not q.get("quantization"):
        return "none (16-bit base)"
    dq = ", double quant" if q.get("double_quant") else ""
    return f"{q['quantization'].upper()}{dq}, compute {q.get('compute_dtype')}"


# ---- exports --------------------------------------------------------------------------------------------------------


def portable(files: AdapterFiles) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config that compute the same ΔW = s·B·A under one rank and one lora_alpha, without rsLoRA.

    Every module's scaling is folded into its B; where ranks differ (rank_pattern), A and B are padded with zero
    rows / columns up to the largest rank, which changes nothing in B·A. lora_alpha = r then makes every reader's
    scaling exactly 1.
    """
    scalings = files.scalings()
    r_max = max(r for r, _ in scalings.values())
    tensors = {PREFIX + k: t for k, t in files.model_tensors.items()}  # PEFT's keys, whichever form the file used
    for module, (r, s) in scalings.items():
        ka, kb = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        a, b = tensors[ka], tensors[kb]
        b = (b.float() * s).to(b.dtype)
        if r < r_max:
            a = torch.cat([a, a.new_zeros(r_max - r, a.shape[1])], dim=0)  # (r_max, in)
            b = torch.cat([b, b.new_zeros(b.shape[0], r_max - r)], dim=1)  # (out, r_max)
        tensors[ka], tensors[kb] = a.contiguous(), b.contiguous()
    config = {**files.peft_config, "r": r_max, "lora_alpha": r_max, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}
    return tensors, config


def _write_peft(out: Path, files: AdapterFiles, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    changed = (CHECKSUM, CONFIG_CHECKSUM, LEGACY_CRC32)  # write_adapter_files records fresh ones
    metadata = {k: v for k, v in files.metadata.items() if k not in changed}
    return write_adapter_files(out, tensors, metadata, config)


def export_portable(files: AdapterFiles, out: Path) -> Path:
    """`export --target peft`: the single-alpha copy (see `portable`)."""
    if files.peft_config.get("use_dora"):
        raise AdapterError(f"{files.config_path}: DoRA adapters have no single-alpha form (the magnitude vector "
                           "rescales each output); PEFT reads the folder as it is, or merge it with PEFT")
    tensors, config = portable(files)
    return _write_peft(out, files, tensors, config)


def export(files: AdapterFiles, target: str, output: str | os.PathLike, *, base: str | None = None,
           max_lora_rank: int | None = None) -> tuple[Path, Verdict]:
    """Check `files` against `target`'s rules and write what that runtime reads to `output`.

    Returns (the path written, the verdict on the adapter as it was). Raises `AdapterError` with the reason and the
    alternative when the runtime cannot serve the adapter; nothing is written then.
    """
    if target not in BY_TARGET:
        raise AdapterError(f"export: unknown target {target!r}; choose from {', '.join(BY_TARGET)}")
    rt = BY_TARGET[target]
    v = verdicts(files, max_lora_rank)[rt.name]
    if v.status == REFUSED:
        raise AdapterError(f"--target {target}: {files.folder} cannot be served: {v.reason}; {v.fix}")
    output = Path(output)
    if output.resolve() == files.folder.resolve():
        raise AdapterError(f"export: --output {output} is the adapter folder itself; choose a new one")
    if target == "peft":
        return export_portable(files, output), v
    if target == "vllm":  # vLLM applies the adapter's own scalings: the files as they are
        return _write_peft(output, files, dict(files.tensors), dict(files.peft_config)), v
    return write_gguf(files, base_config(files, base), gguf_path(output)), v


# ---- commands -------------------------------------------------------------------------------------------------------


def _rank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-lora-rank", type=int, metavar="N",
                   help=f"the max_lora_rank your vLLM server runs with ({', '.join(map(str, VLLM_MAX_LORA_RANKS))})")


def inspect_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank inspect ADAPTER [--max-lora-rank N] [--export-portable OUT]`."""
    p = argparse.ArgumentParser(prog="hf-lowrank inspect", description="Describe an adapter and what each runtime "
                                "does with it: accepted, needs export (hf-lowrank export), or refused.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--revision", help="adapter revision when ADAPTER is a repo id")
    _rank_arg(p)
    p.add_argument("--export-portable", metavar="OUT", help="the same as `hf-lowrank export ADAPTER --target peft "
                   "--output OUT`: scalings folded into B, one r, lora_alpha = r, no rsLoRA, no patterns")
    args = p.parse_args(argv)
    try:
        files = read(args.adapter, revision=args.revision, describe_only=True)
        print(describe(files, args.max_lora_rank))
        if args.export_portable:
            out = export_portable(files, Path(args.export_portable))
            print(f"portable copy written to {out} ({os.path.getsize(out / WEIGHTS_NAME):,} bytes): one r, "
                  "lora_alpha = r, no rsLoRA, no patterns")
    except AdapterError as e:
        print(f"hf-lowrank inspect: {e}", file=sys.stderr)
        return 1
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank export ADAPTER --target peft|vllm|llama.cpp --output OUT [--base PATH] [--max-lora-rank N]`."""
    p = argparse.ArgumentParser(prog="hf-lowrank export", description="Check an adapter against a runtime's rules "
                                "and write what that runtime reads, converted where that keeps the outputs equal.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--target", required=True, choices=tuple(BY_TARGET),
                   help="peft: single-alpha PEFT folder; vllm: checked PEFT folder; llama.cpp: GGUF LoRA file")
    p.add_argument("--output", required=True, help="folder (peft, vllm) or .gguf file / folder (llama.cpp)")
    p.add_argument("--base", help="llama.cpp: base model folder or repo id for its config (default: the recorded "
                   "base)")
    p.add_argument("--revision", help="adapter revision when ADAPTER is a repo id")
    _rank_arg(p)
    args = p.parse_args(argv)
    try:
        files = read(args.adapter, revision=args.revision, describe_only=True)
        out, v = export(files, args.target, args.output, base=args.base, max_lora_rank=args.max_lora_rank)
    except AdapterError as e:
        print(f"hf-lowrank export: {e}", file=sys.stderr)
        return 1
    rt = BY_TARGET[args.target]
    converted = " (scalings folded into B)" if v.status == NEEDS_EXPORT or args.target == "peft" else ""
    print(f"{rt.name}: written to {out}{converted}")
    if args.target == "vllm":
        print(f"serve it: {v.reason}")
    elif args.target == "llama.cpp":
        print(f"serve it: Llama(model_path=BASE.gguf, lora_path={str(out)!r}) (BASE.gguf: llama.cpp's "
              "convert_hf_to_gguf.py of the 16-bit base)")
    return 0
