"""`hf-lowrank merge`: an adapter folded into its base, written as a standard model folder.

The adapter is checked against the base exactly as `load_adapter` checks it (on a weightless copy), then
    base shard ──► every 4-bit layer of the QLoRA model: W0 → NF4 → dequantized W0' (what the adapter trained
    against, reproduced exactly with the recorded settings) ──► + s·B·A in float32 ──► --dtype ──► output shard
(`hf_lowrank.merge.merge_state_dict`, the same fold as the in-memory merge). One shard at a time, so memory stays
near one shard; nothing is requantized. The output folder is built beside its target and moved into place in one
rename. Then the QLoRA model and the merged one run on the same sample and the logits difference (the drift) is
printed. `inspect` and the per-runtime exports are in `hf_lowrank.runtimes`.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import replace_folder
from .format import (
    INDEX_FILE,
    SINGLE_FILE,
    AdapterError,
    linked_outside,
)
from .layers import LORA_A, LORA_B, LORA_MAGNITUDE
from .loading import model_class, read, resolve_base
from .merge import merge_state_dict
from .state import AdapterFiles, check_adapter

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
    """Module kinds from a meta-device model, which is also checked against the adapter exactly as `load_adapter`
    checks a real one (keys, shapes, ranks); which layers are 4-bit from transformers' own bitsandbytes quantizer
    (`compat.quantized_modules`: the decision `from_pretrained` made when the adapter was trained)."""
    from transformers import AutoConfig

    from .compat import quantized_modules
    from .layers import is_conv1d
    from .quantize import bnb_config

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = model_class(files).from_config(config)
    check_adapter(model, files)
    conv1d = {n for n, m in model.named_modules() if is_conv1d(m)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    quantized: set[str] = set()
    if files.config.quantization:
        quantized = quantized_modules(model, bnb_config(files.config))
    return Layout(conv1d, quantized, prefix)


def _shards(base: Path) -> tuple[dict | None, list[str]]:
    """(the base's index or None, its shard file names); every name must be a plain file name inside `base`, so
    neither reading the base nor writing the output can leave their folders."""
    index_path = base / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            shards = list(dict.fromkeys(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise AdapterError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(index.get("metadata", {}), dict):
            raise AdapterError(f"{index_path}: 'metadata' is {json.dumps(index['metadata'])[:60]}, not an object; "
                               "a safetensors index's metadata maps names to values (nothing was written)")
    elif (base / SINGLE_FILE).is_file():
        index, shards = None, [SINGLE_FILE]
    else:
        raise AdapterError(f"{base} has neither {SINGLE_FILE} nor {INDEX_FILE}: merge reads safetensors bases only")
    for shard in shards:
        plain = isinstance(shard, str) and shard == Path(shard).name and shard not in ("", ".", "..") and \
            not shard.startswith(".") and shard.endswith(".safetensors")
        if not plain:
            raise AdapterError(f"{index_path}: shard name {shard!r} is not a plain .safetensors file name inside the "
                               "base folder; refusing to read or write it (nothing was written)")
        if not (base / shard).is_file():
            raise AdapterError(f"{base}: shard {shard} named by {INDEX_FILE} is missing")
    return index, shards


def merge_to_folder(files: AdapterFiles, base: Path, output: Path, dtype: torch.dtype,
                    log: Callable[[str], None] = print, overwrite: bool = False) -> Path:
    """Write the merged model as a standard transformers folder, shard by shard as the base is sharded.

    Everything is checked before the first byte is written; the folder appears at `output` whole or not at all.
    """
    if output.exists() and output.resolve() == base.resolve():
        raise AdapterError(f"merge: --output {output} is the base folder itself; choose a new folder")
    if output.exists() and not output.is_dir():
        raise AdapterError(f"merge: --output {output} is a file; give a folder")
    index, shards = _shards(base)
    lay = layout(files, base)
    scalings = {m: s for m, (_, s) in files.scalings().items()}
    saved = files.saved_tensors()
    adapter = {**saved, **{f"{m}.{LORA_A if w == 'A' else LORA_B}": t for m, ab in files.lora_tensors().items()
                           for w, t in ab.items()},
               **{f"{m}.{LORA_MAGNITUDE}": t for m, t in files.magnitudes().items()}}
    token_rows = files.token_rows()
    known = set(scalings) | lay.quantized | lay.conv1d | {k.rsplit(".", 1)[0] for k in saved} | set(token_rows)
    # a QLoRA model was loaded with every float tensor in the compute dtype: reproduce that before folding
    load_dtype = getattr(torch, files.config.compute_dtype) if files.config.quantization else None

    def dequantize(w: torch.Tensor) -> torch.Tensor:
        from .quantize import nf4_roundtrip

        return nf4_roundtrip(w, files.config)

    def fill(tmp: Path) -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import save_file
        from transformers import AutoConfig

        done: set[str] = set()
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(_progress(shards, "merging")):
            try:
                with safe_open(base / shard, framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
            except (SafetensorError, OSError) as e:
                raise AdapterError(f"merge: base shard {base / shard} cannot be read ({e}); nothing was written") \
                    from None
            if load_dtype is not None:
                tensors = {k: t.to(load_dtype) if t.is_floating_point() else t for k, t in tensors.items()}
            merged = merge_state_dict(tensors, adapter, scalings, dtype, module_of=lambda k: lay.module_of(k, known),
                                      transposed=lay.conv1d, quantized=lay.quantized, dequantize=dequantize,
                                      token_rows=token_rows, done=done)
            del tensors
            if i == len(shards) - 1:  # saved modules the base checkpoint lacks (a new classification head)
                merged.update({k: t.to(dtype) for k, t in saved.items() if k not in done})
                done |= set(saved)
            save_file(merged, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(merged, shard))
            total += sum(t.numel() * t.element_size() for t in merged.values())
            log(f"  wrote {shard} ({len(merged)} tensors)")
            del merged
        missing = sorted(set(scalings) - done)
        if missing:
            raise AdapterError(f"merge: adapted modules {missing[:3]} were not found in {base}'s checkpoint keys "
                               "(this architecture renames its weights on load); merge in Python with "
                               "hf_lowrank.merge(model)")
        if index is not None:
            new_index = {"metadata": {**index.get("metadata", {}), "total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        config = AutoConfig.from_pretrained(base)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        for extra in sorted(base.iterdir()):  # tokenizer, generation config, chat template...
            if not extra.is_file() or extra.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt") or \
                    extra.name in ("config.json", INDEX_FILE) or extra.name.startswith("."):
                continue
            # a Hub cache snapshot links every file into its repo's blobs: copied (the content, not the link);
            # a link anywhere else is not followed
            if (target := linked_outside(base, extra)) is not None:
                log(f"  skipped {extra.name}: a symlink out of {base} (to {target!r})")
                continue
            shutil.copy2(extra, tmp / extra.name)

    try:
        return replace_folder(output, fill, overwrite=overwrite)
    except FileExistsError as e:
        raise AdapterError(f"merge: {e}") from None


def _progress(items: list[str], desc: str):
    """A progress bar over `items` on a terminal (tqdm, which transformers depends on); the items as they are
    elsewhere."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="shard", file=sys.stderr)


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
    from .loading import load

    cls = model_class(files)
    qlora = load(cls, str(adapter), base=str(base))
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
    """`hf-lowrank merge ADAPTER --output DIR [--base PATH] [--dtype bfloat16] [--overwrite]`."""
    from .commandline import ArgumentParser, UsageError, report
    from .hub import HubError
    from .loading import check_base

    p = ArgumentParser(prog="hf-lowrank merge", description="Fold an adapter into its base and write a standard "
                       "model folder (no LoRA layers, no 4-bit weights), shard by shard.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model folder or repo id (default: the base recorded in the adapter)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the merged weights (default: the compute dtype for QLoRA adapters, else the base's)")
    p.add_argument("--revision", help="adapter revision when ADAPTER is a repo id")
    p.add_argument("--no-drift", action="store_true", help="skip loading both models to measure the drift")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it exists and is not empty")
    args = p.parse_args(argv)
    try:
        output = Path(args.output)
        _check_output(output, args.overwrite)
        files = read(args.adapter, revision=args.revision)
        name = args.base or files.base_model
        if name:
            check_base(name, files.base_revision if name == files.base_model else None, files,
                       given_as=f"--base {name!r}", fix="pass --base with the base model's folder or Hub id")
        base = resolve_base(files, args.base)
        dtype = _merge_dtype(args.dtype, files, base)
        print(f"merging {files.folder} into {base} -> {output} ({str(dtype).removeprefix('torch.')})")
        merge_to_folder(files, base, output, dtype, overwrite=args.overwrite)
        if not args.no_drift:
            d = measure_drift(files.folder, base, output, files, dtype)
            print(f"drift (QLoRA model vs merged, {d['tokens']} tokens): max |Δlogits| = {d['max_abs']:.3e}, "
                  f"relative = {d['relative']:.3e}")
    except (AdapterError, HubError, UsageError) as e:
        return report("hf-lowrank merge", e)
    print(f"merged model written to {output}")
    return 0


def _check_output(output: Path, overwrite: bool) -> None:
    """`merge --output`: a new or empty folder, or an existing one with `--overwrite` (then replaced whole)."""
    from .commandline import UsageError

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for the merged model")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"--output {output} already exists and is not empty; choose a new folder, or pass "
                         "--overwrite to replace it with the merged model")


def _merge_dtype(name: str | None, files: AdapterFiles, base: Path) -> torch.dtype:
    if name:
        return getattr(torch, name)
    if files.config.quantization:
        return getattr(torch, files.config.compute_dtype)
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{base / 'config.json'} cannot be read ({e}); pass --dtype") from None
    recorded = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return getattr(torch, recorded) if recorded in ("bfloat16", "float16", "float32") else torch.float32


# inspect moved to hf_lowrank.runtimes (with export); kept importable from here for existing callers
from .runtimes import inspect_main  # noqa: E402, F401
