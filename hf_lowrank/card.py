"""The model card (README.md) written beside an adapter."""

from __future__ import annotations

import json
from typing import Any


def model_card(peft_config: dict[str, Any], metadata: dict[str, str], training: dict[str, Any] | None = None,
               repo_id: str | None = None) -> str:
    base = peft_config.get("base_model_name_or_path") or metadata.get("hf_lowrank.base_model") or ""
    quant = json.loads(metadata.get("hf_lowrank.quantization", '{"quantization": null}'))
    tags = ["lora", "hf-lowrank", "peft"] + (["qlora"] if quant.get("quantization") else [])
    if base:
        tags.append(f"base_model:adapter:{base}")
    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {base}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")
    targets = peft_config.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    scaling = "α/√r (rsLoRA)" if peft_config.get("use_rslora") else "α/r"
    where = repo_id or "path/to/this/adapter"
    lines = [
        *front, "",
        f"# LoRA adapter{f' for {base}' if base else ''}", "",
        "Trained with [hf-lowrank](https://github.com/hf-lowrank/hf-lowrank) (`hf-lowrank`), saved in PEFT's format.",
        "", "## Settings", "",
        "| setting | value |", "|---|---|",
        f"| base model | `{base or 'unknown'}` |",
        f"| quantization | {_quant_text(quant)} |",
        f"| rank r / alpha | {peft_config.get('r')} / {peft_config.get('lora_alpha')} (scaling {scaling}) |",
        f"| target modules | {targets} |",
        f"| dropout | {peft_config.get('lora_dropout')} |",
        f"| modules_to_save | {peft_config.get('modules_to_save') or '—'} |",
        f"| rank / alpha patterns | {peft_config.get('rank_pattern') or '—'} / {peft_config.get('alpha_pattern') or '—'} |",
        f"| hf_lowrank version | {metadata.get('hf_lowrank.version', '?')} |",
    ]
    if training:
        lines += ["", "## Training", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(training.items())]
    lines += [
        "", "## Usage", "", "With hf_lowrank:", "", "```python",
        "import hf_lowrank",
        "from transformers import AutoModelForCausalLM",
        f'model = hf_lowrank.load(AutoModelForCausalLM, "{where}")',
        "```", "", "With PEFT:", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE"}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "```", "",
    ]
    return "\n".join(lines)


def _quant_text(q: dict[str, Any]) -> str:
    if not q.get("quantization"):
        return "none (16-bit base)"
    dq = ", double quant" if q.get("double_quant") else ""
    return f"{q['quantization'].upper()}{dq}, compute {q.get('compute_dtype')}, storage {q.get('quant_storage')}"
