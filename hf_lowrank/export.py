"""`hf-lowrank merge` and `hf-lowrank inspect`: adapters out of hf_lowrank and into other runtimes.

merge   base shard ──► every 4-bit layer of the QLoRA model: W0 → NF4 → dequantized W0' (what the adapter trained
        against, reproduced exactly with the recorded settings) ──► + s·B·A in float32 ──► --dtype ──► output shard.
        One shard at a time, so memory stays near one shard; nothing is requantized. Then the QLoRA model and the
        merged one run on the same sample and the logits difference (the drift) is printed.
inspect config, ranks, targets, size, base, and which runtimes read the adapter as it is; `--export-portable`
        writes a copy that single-alpha readers (llama.cpp, vLLM) compute correctly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .state import (
    CHECKSUM,
    CONFIG_NAME,
    LEGACY_CRC32,
    META,
    PREFIX,
    WEIGHTS_NAME,
    AdapterError,
    AdapterFiles,
    atomic_write_files,
    read_adapter,
    write_adapter_files,
)

#: adapter_config.json task_type → the transformers Auto class that builds the model it adapts.
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def model_class(files: AdapterFiles):
    """The Auto class for the adapter's task (causal LM when the config does not say)."""
    import transformers

    return getattr(transformers, TASK_CLASSES.get(files.peft_config.get("task_type") or "", "AutoModelForCausalLM"))


def resolve_base(files: AdapterFiles, base: str | None = None) -> Path:
    """A local folder with the base's config and safetensors: `base`, or the base the adapter records (downloaded
    from the Hub at its recorded revision when it is a repo id)."""
    name = base or files.base_model
    if not name:
        raise AdapterError(f"{files.config_path}: base_model_name_or_path is empty; pass --base PATH")
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    revision = files.base_revision if name == files.base_model else None
    return Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                           "*.model", "*.tiktoken"]))


# ---- per-module scaling and deltas ----------------------------------------------------------------------------------


def module_scalings(files: AdapterFiles) -> dict[str, tuple[int, float]]:
    """{module name: (rank, scaling)} as the adapter's layers apply them (ranks from the tensors themselves)."""
    cfg = files.config
    out = {}
    for key, t in files.tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            r = t.shape[0]
            alpha = cfg.alpha_for(module)
            out[module] = (r, alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
    return out


def delta(files: AdapterFiles, module: str, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A in float32, (out, in)."""
    a = files.tensors[f"{PREFIX}{module}.lora_A.weight"].float()  # (r, in)
    b = files.tensors[f"{PREFIX}{module}.lora_B.weight"].float()  # (out, r)
    return (b @ a) * scaling  # (out, in)


def saved_tensors(files: AdapterFiles) -> dict[str, torch.Tensor]:
    """modules_to_save copies: model key → tensor."""
    return {k.removeprefix(PREFIX): t for k, t in files.tensors.items() if ".lora_A." not in k and ".lora_B." not in k}


# ---- merge ----------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """What the merge needs to know about the base architecture, from a weightless (meta) copy of it."""

    conv1d: set[str]  # modules that store their weight (in, out)
    quantized: set[str]  # modules the QLoRA load stored in 4 bits
    prefix: str  # base_model_prefix, for checkpoints saved from the bare base model

    def module_of(self, key: str, known: set[str]) -> str:
        """The model's module name for a checkpoint key (checkpoints of the bare base lack the prefix)."""
        module = key.rsplit(".", 1)[0]
        if module in known or not self.prefix:
            return module
        with_prefix = f"{self.prefix}.{module}"
        return with_prefix if with_prefix in known else module


def layout(files: AdapterFiles, base: Path) -> Layout:
    """Module kinds from a meta-device model; which layers are 4-bit from transformers' own bitsandbytes quantizer
    (seams.quantized_modules: the decision `from_pretrained` made when the adapter was trained)."""
    from transformers import AutoConfig

    from .layers import is_conv1d

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = model_class(files).from_config(config)
    conv1d = {n for n, m in model.named_modules() if is_conv1d(m)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    quantized: set[str] = set()
    if files.config.quantization:
        from .quantize import bnb_config
        from .seams import quantized_modules

        quantized = quantized_modules(model, bnb_config(files.config))
    return Layout(conv1d, quantized, prefix)


def nf4_roundtrip(w: torch.Tensor, files: AdapterFiles) -> torch.Tensor:
    """The 4-bit layer's dequantized weight, float32 (out, in): cast to the load dtype, quantize as
    bitsandbytes' `Linear4bit` does on load, dequantize."""
    import bitsandbytes.functional as bnbf

    cfg = files.config
    q, state = bnbf.quantize_4bit(w.to(getattr(torch, cfg.compute_dtype)).contiguous(), blocksize=64,
                                  compress_statistics=cfg.double_quant, quant_type=cfg.quantization,
                                  quant_storage=getattr(torch, cfg.quant_storage))
    return bnbf.dequantize_4bit(q, state).float()


def merge_tensors(tensors: dict[str, torch.Tensor], files: AdapterFiles, lay: Layout, known: set[str],
                  scalings: dict[str, tuple[int, float]], dtype: torch.dtype,
                  done: set[str]) -> dict[str, torch.Tensor]:
    """One shard's tensors merged: 4-bit layers round-tripped through NF4, deltas added, saved modules replaced.

    For a QLoRA adapter every float tensor first goes through the compute dtype, as it did when the QLoRA model was
    loaded, so the merged model holds the values the adapter was trained with.
    """
    saved = saved_tensors(files)
    load_dtype = getattr(torch, files.config.compute_dtype) if files.config.quantization else None
    out = {}
    for key, t in tensors.items():
        if load_dtype is not None and t.is_floating_point():
            t = t.to(load_dtype)
        module = lay.module_of(key, known)
        model_key = f"{module}.{key.rsplit('.', 1)[1]}"
        if model_key in saved:
            t = saved[model_key]
            done.add(model_key)
        elif key.endswith(".weight") and (module in lay.quantized or module in scalings):
            w = t.float().T if module in lay.conv1d else t.float()  # (out, in)
            if module in lay.quantized:
                w = nf4_roundtrip(w, files)
            if module in scalings:
                w = w + delta(files, module, scalings[module][1])
                done.add(module)
            t = w.T if module in lay.conv1d else w
        out[key] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    return out


def _write_safetensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write_files(folder, {name: lambda p: save_file(tensors, p, metadata={"format": "pt"})})


def merge_to_folder(files: AdapterFiles, base: Path, output: Path, dtype: torch.dtype,
                    log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Write the merged model as a standard transformers folder, shard by shard as the base is sharded
    (`progress`: a progress bar over the shards on stderr, `log` lines written above it)."""
    from safetensors import safe_open
    from tqdm import tqdm
    from transformers import AutoConfig

    index_path = base / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        shards = list(dict.fromkeys(index["weight_map"].values()))
    elif (base / SINGLE_FILE).is_file():
        index, shards = None, [SINGLE_FILE]
    else:
        raise AdapterError(f"{base} has neither {SINGLE_FILE} nor {INDEX_FILE}: merge reads safetensors bases only")
    if output.resolve() == base.resolve():
        raise AdapterError(f"merge: --output {output} is the base folder itself; choose a new folder")
    lay = layout(files, base)
    scalings = module_scalings(files)
    known = set(scalings) | lay.quantized | lay.conv1d | {k.rsplit(".", 1)[0] for k in saved_tensors(files)}
    output.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(shards), desc="merging", unit="shard", disable=not progress, file=sys.stderr)
    say = (lambda m: bar.write(m, file=sys.stdout)) if progress else log
    for i, shard in enumerate(shards):
        with safe_open(base / shard, framework="pt") as f:
            merged = merge_tensors({k: f.get_tensor(k) for k in f.keys()}, files, lay, known, scalings, dtype,  # noqa: SIM118
                                   done)
        if i == len(shards) - 1:  # saved modules the base checkpoint lacks (a new classification head)
            merged.update({k: t.to(dtype) for k, t in saved_tensors(files).items() if k not in done})
            done |= set(saved_tensors(files))
        _write_safetensors(output, shard, merged)
        weight_map.update(dict.fromkeys(merged, shard))
        total += sum(t.numel() * t.element_size() for t in merged.values())
        say(f"  wrote {shard} ({len(merged)} tensors)")
        bar.update(1)
        del merged
    bar.close()
    missing = sorted(set(scalings) - done)
    if missing:
        raise AdapterError(f"merge: adapted modules {missing[:3]} were not found in {base}'s checkpoint keys (this "
                           "architecture renames its weights on load); merge in Python with hf_lowrank.merge(model)")
    if index is not None:
        index = {"metadata": {**index.get("metadata", {}), "total_size": total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write_files(output, {INDEX_FILE: lambda p: Path(p).write_text(text)})
    config = AutoConfig.from_pretrained(base)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(output)
    for extra in base.iterdir():  # tokenizer, generation config, chat template...
        if extra.is_file() and extra.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt") and \
                extra.name not in ("config.json", INDEX_FILE) and not extra.name.startswith("."):
            shutil.copy2(extra, output / extra.name)
    return output


def sample_input(vocab_size: int, length: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, length), generator=g)


def _outputs(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x.to(model.device))
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float().cpu()


def measure_drift(adapter: Path, base: Path, merged: Path, files: AdapterFiles, dtype: torch.dtype) -> dict[str, float]:
    """Max |Δlogits| and max |Δlogits| / max |logits| between the QLoRA model and the merged one, on one sample.
    The models are loaded one after the other, never both at once."""
    from . import hook

    cls = model_class(files)
    qlora = hook.load(cls, str(adapter), base=str(base))
    x = sample_input(qlora.config.vocab_size)
    reference = _outputs(qlora, x)
    del qlora
    plain = cls.from_pretrained(merged, dtype=dtype)
    got = _outputs(plain, x)
    del plain
    max_abs = (got - reference).abs().max().item()
    return {"max_abs": max_abs, "relative": max_abs / max(reference.abs().max().item(), 1e-12),
            "tokens": x.numel()}


def merge_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank merge ADAPTER --output DIR [--base PATH] [--dtype bfloat16]`."""
    from .cli import ArgumentParser

    p = ArgumentParser(prog="hf-lowrank merge", description="Fold an adapter into its base and write a "
                                "standard model folder (no LoRA layers, no 4-bit weights), shard by shard.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model folder or repo id (default: the base recorded in the adapter)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the merged weights (default: the compute dtype for QLoRA adapters, else the base's)")
    p.add_argument("--revision", help="adapter revision when ADAPTER is a repo id")
    p.add_argument("--no-drift", action="store_true", help="skip loading both models to measure the drift")
    p.add_argument("--overwrite", action="store_true", help="write into --output even when it is not empty")
    args = p.parse_args(argv)
    from . import hook
    from .cli import UsageError, report
    from .hub import HubError

    try:
        output = Path(args.output)
        _check_output(output, args.overwrite)
        files = read_adapter(args.adapter, revision=args.revision)
        name = args.base or files.base_model
        if name:
            hook.check_base(name, files.base_revision if name == files.base_model else None, files,
                            given_as=f"--base {name!r}", fix="pass --base with the base model's folder or Hub id")
        base = resolve_base(files, args.base)
        dtype = _merge_dtype(args.dtype, files, base)
        print(f"merging {files.folder} into {base} -> {output} ({str(dtype).removeprefix('torch.')})")
        merge_to_folder(files, base, output, dtype, progress=True)
        if not args.no_drift:
            d = measure_drift(files.folder, base, output, files, dtype)
            print(f"drift (QLoRA model vs merged, {d['tokens']} tokens): max |Δlogits| = {d['max_abs']:.3e}, "
                  f"relative = {d['relative']:.3e}")
    except (AdapterError, HubError, UsageError) as e:
        return report("hf-lowrank merge", e)
    print(f"merged model written to {output}")
    return 0


def _check_output(output: Path, overwrite: bool) -> None:
    """`merge --output`: a new or empty folder, or any folder with `--overwrite` (same-named files are replaced)."""
    from .cli import UsageError

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for the merged model")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"--output {output} already exists and is not empty; choose a new folder, or pass "
                         "--overwrite to write the merged model into it")


def _merge_dtype(name: str | None, files: AdapterFiles, base: Path) -> torch.dtype:
    if name:
        return getattr(torch, name)
    if files.config.quantization:
        return getattr(torch, files.config.compute_dtype)
    config = json.loads((base / "config.json").read_text())
    recorded = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, recorded) if recorded in ("bfloat16", "float16", "float32") else torch.float32


# ---- inspect and portable export ----------------------------------------------------------------------------------


def runtimes(files: AdapterFiles) -> dict[str, str]:
    """Which runtimes read the adapter as it is, each with the reason when not (or when only with care)."""
    pc = files.peft_config
    patterns = bool(pc.get("rank_pattern") or pc.get("alpha_pattern"))
    mts = pc.get("modules_to_save")
    out = {"PEFT": "yes", "transformers (model.load_adapter)": "yes (through PEFT)"}
    if pc.get("use_dora"):
        out["vLLM"] = "no: vLLM refuses DoRA"
    elif mts:
        out["vLLM"] = f"no: vLLM refuses modules_to_save ({', '.join(mts)}); merge instead"
    elif patterns:
        out["vLLM"] = "not as is: vLLM applies one r and lora_alpha to every module; use --export-portable"
    else:
        out["vLLM"] = f"yes (start it with --max-lora-rank >= {max(r for r, _ in module_scalings(files).values())})"
    if pc.get("use_rslora") or patterns:
        out["llama.cpp"] = "not as is: llama.cpp reads one lora_alpha (no rsLoRA, no patterns); use --export-portable"
    elif mts:
        out["llama.cpp"] = "partly: convert_lora_to_gguf ignores modules_to_save; merge instead"
    else:
        out["llama.cpp"] = "yes (convert_lora_to_gguf.py)"
    return out


def describe(files: AdapterFiles) -> str:
    pc, meta = files.peft_config, files.metadata
    scalings = module_scalings(files)
    ranks = sorted({r for r, _ in scalings.values()})
    n_params = sum(t.numel() for t in files.tensors.values())
    tensor_bytes = sum(t.numel() * t.element_size() for t in files.tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in files.tensors.values()})
    targets = pc.get("target_modules")
    quant = json.loads(meta[META + "quantization"]) if META + "quantization" in meta else None
    lines = [
        f"adapter         {files.folder}",
        f"written by      {'hf_lowrank ' + meta[META + 'version'] if files.written_by_us else 'another tool (PEFT?)'}",
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
        f"parameters      {n_params:,} ({', '.join(dtypes)})",
        f"bytes           {tensor_bytes:,} in tensors; {files.weights_path.stat().st_size:,} on disk",
        "runtimes:",
    ]
    lines += [f"  {name:<36} {verdict}" for name, verdict in runtimes(files).items()]
    return "\n".join(lines)


def _quant(q: dict[str, Any] | None) -> str:
    if q is None:
        return "not recorded (a 16-bit base unless you know otherwise)"
    if not q.get("quantization"):
        return "none (16-bit base)"
    dq = ", double quant" if q.get("double_quant") else ""
    return f"{q['quantization'].upper()}{dq}, compute {q.get('compute_dtype')}"


def portable(files: AdapterFiles) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config that compute the same ΔW = s·B·A under one rank and one lora_alpha, without rsLoRA.

    Every module's scaling is folded into its B; where ranks differ (rank_pattern), A and B are padded with zero
    rows / columns up to the largest rank, which changes nothing in B·A. lora_alpha = r then makes every reader's
    scaling exactly 1.
    """
    scalings = module_scalings(files)
    r_max = max(r for r, _ in scalings.values())
    tensors = dict(files.tensors)
    for module, (r, s) in scalings.items():
        ka, kb = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        a, b = files.tensors[ka], files.tensors[kb]
        b = (b.float() * s).to(b.dtype)
        if r < r_max:
            a = torch.cat([a, a.new_zeros(r_max - r, a.shape[1])], dim=0)  # (r_max, in)
            b = torch.cat([b, b.new_zeros(b.shape[0], r_max - r)], dim=1)  # (out, r_max)
        tensors[ka], tensors[kb] = a.contiguous(), b.contiguous()
    config = {**files.peft_config, "r": r_max, "lora_alpha": r_max, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}
    return tensors, config


def export_portable(files: AdapterFiles, out: Path) -> Path:
    if files.peft_config.get("use_dora"):
        raise AdapterError(f"{files.config_path}: DoRA adapters have no single-alpha form (the magnitude vector "
                           "rescales each output); merge the adapter with PEFT instead")
    tensors, config = portable(files)
    metadata = {k: v for k, v in files.metadata.items() if k not in (CHECKSUM, LEGACY_CRC32)}  # B changed
    return write_adapter_files(out, tensors, metadata, config)


def inspect_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank inspect ADAPTER [--export-portable OUT]`."""
    from .cli import ArgumentParser

    p = ArgumentParser(prog="hf-lowrank inspect", description="Describe an adapter and which runtimes "
                                "accept it; optionally write a copy every single-alpha reader computes correctly.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--revision", help="adapter revision when ADAPTER is a repo id")
    p.add_argument("--export-portable", metavar="OUT", help="write a copy with scalings folded into B: one r, "
                   "lora_alpha = r, no rsLoRA, no rank/alpha patterns")
    args = p.parse_args(argv)
    from .cli import report
    from .hub import HubError

    try:
        files = read_adapter(args.adapter, revision=args.revision, describe_only=True)
        print(describe(files))
        if args.export_portable:
            out = export_portable(files, Path(args.export_portable))
            print(f"portable copy written to {out} ({os.path.getsize(out / WEIGHTS_NAME):,} bytes): one r, "
                  f"lora_alpha = r, no rsLoRA, no patterns; read it with any {CONFIG_NAME} reader")
    except (AdapterError, HubError) as e:
        return report("hf-lowrank inspect", e)
    return 0
