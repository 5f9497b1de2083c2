"""A GGUF LoRA file for llama.cpp, written with the `gguf` package (the `[gguf]` extra), for Llama-architecture bases.

What llama.cpp reads (src/llama-adapter.cpp): general.type = "adapter", adapter.type = "lora", one float32
adapter.lora.alpha, and per adapted weight W (GGUF name, e.g. blk.0.attn_q.weight) a pair W.lora_a (r, in) and
W.lora_b (out, r). It computes ΔW = (α/r)·B·A with that pair's own r, so every module's scaling s is folded into
B' = (s·r/α)·B; for an adapter without rsLoRA and alpha patterns the factor is 1 and the file holds the tensors as
they are. q and k projections get their rows in GGUF's rotary order, as llama.cpp's model converter stores W0.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .atomic import fsync_dir
from .format import AdapterError
from .loading import model_class, resolve_base
from .state import AdapterFiles, check_adapter

#: base architectures whose GGUF tensor names and q/k row order are written here (transformers name → GGUF's).
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise AdapterError("export --target llama.cpp writes GGUF with the `gguf` package, which is not installed: "
                           'pip install "hf-lowrank[gguf]"') from None
    return gguf


def base_config(files: AdapterFiles, base: str | None) -> Any:
    """The base's transformers config (config.json only is fetched for a Hub base), checked against the adapter on a
    weightless copy of the model, exactly as `load_adapter` checks a real one."""
    from transformers import AutoConfig

    folder = resolve_base(files, base, allow_patterns=("*.json",))
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = model_class(files).from_config(config)
    check_adapter(model, files)
    return config


def _rope_rows(n_heads: int, out: int) -> torch.Tensor:
    """Row order that takes a q/k projection from transformers' rotary layout (per head: all first halves of the
    rotated pairs, then all second halves) to GGUF's (per head: the two values of each pair side by side).

    head h, pair i: HF rows h·d + i and h·d + d/2 + i  ──►  GGUF rows h·d + 2i and h·d + 2i + 1   (d = out / n_heads)
    """
    d = out // n_heads
    rows = torch.arange(out).reshape(n_heads, 2, d // 2)  # (head, half, pair)
    return rows.transpose(1, 2).reshape(out)  # (head, pair, half) flattened


def gguf_tensors(files: AdapterFiles, config: Any) -> tuple[float, dict[str, torch.Tensor]]:
    """(adapter.lora.alpha, {GGUF name: float32 tensor}) for a Llama-architecture base.

    llama.cpp computes ΔW = (α/r)·B·A for each pair with one α and that pair's r; B' = (s·r/α)·B gives back every
    module's own scaling s. A is written as (r, in) and B as (out, r) (GGUF lists dimensions the other way round,
    which is the layout llama.cpp checks for); the rows of q/k's B are put in GGUF's rotary order, as the model
    converter does for the base weights.
    """
    gguf = _gguf()
    arch = next((a for a in (config.architectures or []) if a in GGUF_ARCHITECTURES), None)
    if arch is None:
        raise AdapterError(f"export --target llama.cpp writes Llama-architecture GGUF only; this base is "
                           f"{', '.join(config.architectures or [config.model_type])}. Export with --target peft "
                           "(scalings folded) and convert that folder with llama.cpp's convert_lora_to_gguf.py")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    alpha = float(files.config.lora_alpha)
    out: dict[str, torch.Tensor] = {}
    for module, (r, s) in files.scalings().items():
        if module == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise AdapterError(f"{files.config_path}: lm_head is adapted but the base ties it to the embeddings, "
                               "which llama.cpp stores once; merge instead")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise AdapterError(f"{files.config_path}: module {module} has no tensor in llama.cpp's Llama model")
        pair = files.lora_tensors()[module]
        a, b = pair["A"].float(), pair["B"].float()  # (r, in), (out, r)
        factor = s * r / alpha
        if not math.isclose(factor, 1.0, rel_tol=1e-12):
            b = b * factor
        if module.endswith("self_attn.q_proj"):
            b = b[_rope_rows(n_heads, b.shape[0])]
        elif module.endswith("self_attn.k_proj"):
            b = b[_rope_rows(n_kv, b.shape[0])]
        out[name.removesuffix(".weight") + ".weight.lora_a"] = a.contiguous()
        out[name.removesuffix(".weight") + ".weight.lora_b"] = b.contiguous()
    return alpha, out


def write_gguf(files: AdapterFiles, config: Any, path: Path) -> Path:
    """The GGUF LoRA file, written beside `path` and renamed over it once flushed."""
    from .version import __version__

    gguf = _gguf()
    alpha, tensors = gguf_tensors(files, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCHITECTURES["LlamaForCausalLM"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(files.folder.name)
        writer.add_string("hf_lowrank.version", __version__)
        for name, t in tensors.items():
            writer.add_tensor(name, t.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def gguf_path(output: Path) -> Path:
    """`output` itself when it names a .gguf file, else `adapter_model.gguf` inside the folder `output`."""
    return output if output.suffix == ".gguf" else output / "adapter_model.gguf"
