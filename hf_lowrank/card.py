"""The model card (README.md) written beside an adapter and pushed with it to the Hub.

YAML front matter as the Hub reads it: `library_name: peft` (the Hub's and the Trainer's cue for adapters),
`base_model` and the tag `base_model:adapter:<base>` (which link the adapter to its base's page; only for a base that
is a Hub model id: the Hub rejects a local path there), tags lora / qlora / hf-lowrank; then the quantization and
LoRA settings and usage snippets for hf_lowrank, PEFT and the CLI.
"""

from __future__ import annotations

from typing import Any

from .format import BASE_MODEL, VERSION, hub_model_id, recorded_quantization


def card_tags(peft_config: dict[str, Any], metadata: dict[str, str]) -> list[str]:
    """lora, hf-lowrank, peft, qlora (for a quantized base) and `base_model:adapter:<base>` (for a Hub base)."""
    quant = _quant(metadata)
    hub_base = hub_model_id(_base(peft_config, metadata))
    tags = ["lora", "hf-lowrank", "peft"] + (["qlora"] if quant.get("quantization") else [])
    return tags + ([f"base_model:adapter:{hub_base}"] if hub_base else [])


def _quant(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        return recorded_quantization(metadata) or {"quantization": None}
    except ValueError:
        return {"quantization": None}


GENERATED_MARK = "Trained with [hf-lowrank]"


def is_generated_card(text: str) -> bool:
    """Whether a README.md is the card hf_lowrank writes beside an adapter (and may rewrite): not one the user
    wrote, and not a trainer's card that our adapter section was merged into."""
    return GENERATED_MARK in text[:4000] and ADAPTER_SECTION not in text


def _base(peft_config: dict[str, Any], metadata: dict[str, str]) -> str:
    """The base as a card may name it: a Hub id, never a local path (cards are published); "" when none."""
    return hub_model_id(peft_config.get("base_model_name_or_path") or metadata.get(BASE_MODEL)) or ""


def model_card(peft_config: dict[str, Any], metadata: dict[str, str], training: dict[str, Any] | None = None,
               repo_id: str | None = None, revision: str | None = None) -> str:
    """README.md text for an adapter; `repo_id` / `revision` (where it is pushed) go into the usage snippets."""
    base = _base(peft_config, metadata)
    hub_base = hub_model_id(base)
    front = ["---", "library_name: peft"] + ([f"base_model: {hub_base}"] if hub_base else [])
    front += ["tags:", *[f"- {t}" for t in card_tags(peft_config, metadata)], "---"]
    lines = [
        *front, "",
        f"# LoRA adapter{f' for {base}' if base else ''}", "",
        f"{GENERATED_MARK}(https://github.com/hf-lowrank/hf-lowrank) (`hf-lowrank`), saved in PEFT's format.",
        "", *_settings(peft_config, metadata),
    ]
    if training:
        lines += ["", "## Training", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(training.items())]
    lines += ["", *_usage(peft_config, metadata, repo_id, revision)]
    return "\n".join(lines)


def _settings(peft_config: dict[str, Any], metadata: dict[str, str]) -> list[str]:
    quant = _quant(metadata)
    targets = peft_config.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    scaling = "α/√r (rsLoRA)" if peft_config.get("use_rslora") else "α/r"
    return [
        "## Settings", "",
        "| setting | value |", "|---|---|",
        f"| base model | `{_base(peft_config, metadata) or 'unknown'}` |",
        f"| quantization | {_quant_text(quant)} |",
        f"| rank r / alpha | {peft_config.get('r')} / {peft_config.get('lora_alpha')} (scaling {scaling}) |",
        f"| target modules | {targets} |",
        f"| dropout | {peft_config.get('lora_dropout')} |",
        f"| modules_to_save | {peft_config.get('modules_to_save') or '—'} |",
        f"| rank / alpha patterns | {peft_config.get('rank_pattern') or '—'} / "
        f"{peft_config.get('alpha_pattern') or '—'} |",
        f"| hf_lowrank version | {metadata.get(VERSION, '?')} |",
    ]


def _usage(peft_config: dict[str, Any], metadata: dict[str, str], repo_id: str | None, revision: str | None,
           heading: str = "## Usage") -> list[str]:
    base = _base(peft_config, metadata)
    where = repo_id or "path/to/this/adapter"
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    lines = [
        heading, "", "With hf_lowrank:", "", "```python",
        "import hf_lowrank",
        "from transformers import AutoModelForCausalLM",
        f'model = hf_lowrank.load(AutoModelForCausalLM, "{where}"{rev})  # base + adapter, checked',
        "```", "", "With PEFT:", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE"}")',
        f'model = PeftModel.from_pretrained(base, "{where}"{rev})',
        "```", "",
    ]
    if repo_id:
        cli_rev = f" --revision {revision}" if rev else ""
        lines += ["Download only the adapter files:", "", "```bash", f"hf-lowrank pull {repo_id}{cli_rev}", "```", ""]
    return lines


ADAPTER_SECTION = "## LoRA adapter (hf-lowrank)"


def merge_into_card(text: str, peft_config: dict[str, Any], metadata: dict[str, str],
                    repo_id: str | None = None) -> str:
    """Another card (the Trainer's training summary) made an adapter card: `library_name: peft`, our tags, a Hub
    `base_model` (a local path there is dropped: the Hub rejects it), and our settings and usage appended once.
    Idempotent."""
    from huggingface_hub import ModelCard

    card = ModelCard(text, ignore_metadata_errors=True)
    data = card.data
    data.library_name = "peft"
    tags = list(data.tags or [])
    data.tags = tags + [t for t in card_tags(peft_config, metadata) if t not in tags]
    hub_base = hub_model_id(_base(peft_config, metadata))
    current = data.base_model if isinstance(data.base_model, str) else None
    if hub_base and not current:
        data.base_model = hub_base
    elif current and not hub_model_id(current):
        data.base_model = None
    if ADAPTER_SECTION not in card.text:
        settings = ["#" + line if line.startswith("## ") else line for line in _settings(peft_config, metadata)]
        usage = _usage(peft_config, metadata, repo_id, None, heading="### Usage")
        card.text = card.text.rstrip() + "\n\n" + "\n".join([ADAPTER_SECTION, "", *settings, "", *usage])
    return str(card)


def _quant_text(q: dict[str, Any]) -> str:
    if not q.get("quantization"):
        return "none (16-bit base)"
    dq = ", double quant" if q.get("double_quant") else ""
    return f"{q['quantization'].upper()}{dq}, compute {q.get('compute_dtype')}, storage {q.get('quant_storage')}"
