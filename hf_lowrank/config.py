"""`LowRankConfig`: every LoRA and quantization setting, documented once.

The LoRA fields mean what PEFT's `LoraConfig` fields of the same name mean, so an adapter round-trips through PEFT's
`adapter_config.json` (see `to_peft_dict` / `from_peft_dict`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .patterns import PatternError, check_pattern, first_match, pattern_table

QUANTIZATIONS = ("nf4", "fp4", None)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
INITS = ("kaiming", "gaussian", "loftq")
#: upper bound for r and lora_alpha: far above any real adapter, low enough that a scaling stays finite in bf16.
MAX_RANK_OR_ALPHA = 65_536


@dataclass
class LowRankConfig:
    """What to adapt and how to quantize the frozen base.

    Args:
        r: adapter rank; A is r×in, B is out×r.
        lora_alpha: numerator of the scaling α/r (α/√r with ``use_rslora``).
        lora_dropout: dropout on the adapter's input only, active in training mode only.
        target_modules: ``"all-linear"`` (every Linear / Conv1D / Linear4bit but the output head), a list of names
            (a module matches when its dotted name equals an entry or ends in ``"." + entry``), or a string that is a
            regular expression matched with ``re.fullmatch`` against the whole dotted name.
        exclude_modules: same forms as ``target_modules``; matching modules are never adapted.
        use_rslora: rank-stabilised scaling α/√r, which keeps the update size independent of r.
        rank_pattern: ``{regex: r}``; the first pattern that matches a module's name (fullmatch, or suffix match
            after a dot) overrides ``r`` for it. At most 4,096 keys (`hf_lowrank.patterns.MAX_PATTERN_KEYS`).
        alpha_pattern: ``{regex: alpha}``, as ``rank_pattern`` for ``lora_alpha``.
        modules_to_save: names (same matching as a target list) of whole modules trained and saved in full, such as
            a freshly initialised classification head. ``None`` picks the head of a sequence-classification model.
        init: ``"kaiming"`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A ~ N(0, 1/r), B zero): B = 0, so a fresh
            adapter leaves the base output unchanged. ``"loftq"`` (with a quantized base): A and B from the SVD of
            each layer's NF4 error, so the model starts closer to the 16-bit original (`hf_lowrank.loftq`).
        quantization: ``"nf4"`` (4-bit NormalFloat, the QLoRA default), ``"fp4"``, or ``None`` for plain LoRA on a
            16-bit base.
        double_quant: quantize the per-block absmax constants too (saves ~0.37 bits per parameter).
        compute_dtype: dtype the 4-bit weights are dequantized to for each matmul, and the dtype of the unquantized
            parts of the model (embeddings, norms).
        quant_storage: dtype the packed 4-bit data is stored in. ``uint8`` by default; FSDP and ZeRO-3 can only shard
            the 4-bit weights when this equals the model dtype (hf_lowrank sets it by itself under those launches).
        adapter_dtype: dtype of the A and B weights (``float32`` keeps the optimizer exact, as PEFT does).
        fused_loss: for a causal LM, compute the training loss as a chunked linear + cross-entropy that never holds
            the (batch, sequence, vocab) logits (`hf_lowrank.fused_lm`); training forwards given ``labels`` then
            return ``logits=None``. Evaluation and generation are unchanged; unsupported models keep the stock path.
        use_dora: DoRA, weight-decomposed LoRA: a trainable magnitude per output row rescales W0 + s·B·A to unit
            row norms (`hf_lowrank.layers`); on nn.Linear, Conv1D and Linear4bit (the norm from the dequantized
            weight each forward, never kept). PEFT's field of the same name; vLLM and llama.cpp refuse it (merge).
        trainable_token_indices: rows of an embedding that train (and are saved) on their own, e.g. the ids of
            tokens just added to the tokenizer: a list (rows of the input embedding, and of the output head when it
            is tied to it) or ``{module name: list}`` (PEFT's matching; the first key naming a module counts). The
            embedding must already have those rows (``resize_token_embeddings(len(tokenizer))`` and save the base
            first). PEFT's field of the same name.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): η_B = ratio·η_A, e.g. 16. The Trainer's optimizer (our paged
            default or the user's ``optim``) gets B (and DoRA magnitudes, as PEFT's ``create_loraplus_optimizer``
            groups them) in parameter groups at ratio × the learning rate. ``None`` = one learning rate. A training
            setting: recorded in the adapter's header, not in adapter_config.json (PEFT's LoraConfig has no such
            field).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    quantization: str | None = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    adapter_dtype: str = "float32"
    fused_loss: bool = True
    use_dora: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        bad = _invalid
        if not _positive(self.r, int):
            raise bad("r", self.r, f"a positive int such as 8 or 16 (at most {MAX_RANK_OR_ALPHA:,})")
        if not _positive(self.lora_alpha, (int, float)):
            raise bad("lora_alpha", self.lora_alpha, f"a finite positive number such as 16 or 32 (at most "
                      f"{MAX_RANK_OR_ALPHA:,})")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or \
                not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", self.lora_dropout, "a float in [0, 1), e.g. 0.05")
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules, key=str)  # key=str: a bad entry is reported next
        self._check_names("target_modules", self.target_modules, allow_none=False)
        if isinstance(self.exclude_modules, tuple | set):
            self.exclude_modules = sorted(self.exclude_modules, key=str)
        self._check_names("exclude_modules", self.exclude_modules, allow_none=True)
        if isinstance(self.modules_to_save, collections.abc.Set):
            self.modules_to_save = sorted(self.modules_to_save, key=str)
        self.use_rslora, self.use_dora = _flag(self.use_rslora), _flag(self.use_dora)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, list | tuple) or \
                    not all(isinstance(m, str) for m in self.modules_to_save):
                raise bad("modules_to_save", self.modules_to_save, "a list of module names such as ['classifier']")
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = self._checked_patterns("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = self._checked_patterns("alpha_pattern", self.alpha_pattern, (int, float))
        if self.init not in INITS:
            raise bad("init", self.init, f"one of {INITS}")
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", self.quantization, f"one of {QUANTIZATIONS} (None = no quantization)")
        if self.init == "loftq" and self.quantization is None:
            raise bad("init", self.init, "'kaiming' or 'gaussian' with quantization=None (LoftQ starts the adapter at "
                      "the 4-bit base's error, and an unquantized base has none), or quantization='nf4'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", self.compute_dtype, f"one of {COMPUTE_DTYPES}")
        if self.adapter_dtype not in COMPUTE_DTYPES:
            raise bad("adapter_dtype", self.adapter_dtype, f"one of {COMPUTE_DTYPES}")
        if self.quant_storage not in QUANT_STORAGES:
            raise bad("quant_storage", self.quant_storage, f"one of {QUANT_STORAGES} (the model dtype for FSDP/ZeRO-3)")
        if not isinstance(self.double_quant, bool):
            raise bad("double_quant", self.double_quant, "True or False")
        if not isinstance(self.use_rslora, bool):
            raise bad("use_rslora", self.use_rslora, "True or False")
        if not isinstance(self.fused_loss, bool):
            raise bad("fused_loss", self.fused_loss, "True or False")
        if not isinstance(self.use_dora, bool):
            raise bad("use_dora", self.use_dora, "True or False")
        if self.trainable_token_indices is not None:
            tti = self.trainable_token_indices
            groups = tti.values() if isinstance(tti, dict) else [tti]
            if not (isinstance(tti, (list, tuple, dict)) and all(isinstance(k, str) and k for k in
                    (tti if isinstance(tti, dict) else []))) or not all(_token_list(g) for g in groups):
                raise bad("trainable_token_indices", tti, "a non-empty list of distinct token ids such as [32000, "
                          "32001], or {module name: such a list}")
            self.trainable_token_indices = {k: list(v) for k, v in tti.items()} if isinstance(tti, dict) else \
                list(tti)
        if self.loraplus_lr_ratio is not None and not _positive(self.loraplus_lr_ratio, (int, float)):
            raise bad("loraplus_lr_ratio", self.loraplus_lr_ratio, "None or a finite positive number such as 16")

    @staticmethod
    def _checked_patterns(name: str, patterns: Any, kind: type | tuple[type, ...]) -> dict[str, Any]:
        """A copy of `patterns` once it is a dict of valid regular expressions to positive numbers of `kind`, whose
        keys `rank_for` / `alpha_for` can match in bounded time (they are compiled here, once)."""
        if not isinstance(patterns, dict):
            raise _invalid(name, patterns, "a dict {regex: value} such as {'q_proj': 8}")
        for key, value in patterns.items():
            if not _positive(value, kind):
                raise _invalid(name, {key: value}, f"finite positive numbers{' (ints)' if kind is int else ''} as "
                               f"values (at most {MAX_RANK_OR_ALPHA:,})")
        try:
            pattern_table(tuple(patterns))
        except PatternError as e:
            raise ValueError(f"LowRankConfig.{name} is not valid: {e}.") from None
        return dict(patterns)

    @staticmethod
    def _check_names(name: str, value: Any, allow_none: bool) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, str):
            if value == "all-linear":
                return
            try:
                check_pattern(value)
            except PatternError as e:
                raise ValueError(
                    f"LowRankConfig.{name}={_shown(value)} is not valid: a string is a regular expression ({e}); use a "
                    f"list such as ['q_proj', 'v_proj'] for plain names, or 'all-linear'."
                ) from None
            return
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return
        raise ValueError(
            f"LowRankConfig.{name}={_shown(value)} is not valid: expected 'all-linear', a non-empty list of module "
            f"names such as ['q_proj', 'v_proj'], or a regular expression string."
        )

    # ---- per-module settings -------------------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        return first_match(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return first_match(self.alpha_pattern, module_name, self.lora_alpha)

    def replace(self, **changes: Any) -> LowRankConfig:
        return dataclasses.replace(self, **changes)

    # ---- PEFT's adapter_config.json ------------------------------------------------------------------------------

    def to_peft_dict(self, *, task_type: str | None, base_model_name_or_path: str | None, revision: str | None,
                     fan_in_fan_out: bool, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        """The fields PEFT's `LoraConfig` knows, and no others (unknown keys make PEFT warn)."""
        targets = self.target_modules if target_modules is None else target_modules
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": revision,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "exclude_modules": self.exclude_modules,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": self.modules_to_save,
            "trainable_token_indices": self.trainable_token_indices,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": fan_in_fan_out,
            # a LoftQ init is done once loaded: the file holds plain LoRA weights for any reader
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], **overrides: Any) -> LowRankConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json has peft_type={d.get('peft_type')!r}; hf_lowrank reads LORA only.")
        if d.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json has bias={d['bias']!r}; hf_lowrank supports bias='none' only.")
        if d.get("layers_to_transform") is not None:
            raise ValueError("adapter_config.json sets layers_to_transform; hf_lowrank does not support it.")
        init = d.get("init_lora_weights", True)
        fields = {
            "r": d.get("r", 8),
            "lora_alpha": d.get("lora_alpha", 8),
            "lora_dropout": d.get("lora_dropout", 0.0),
            "target_modules": _given(d, "target_modules", "all-linear"),
            "exclude_modules": d.get("exclude_modules"),
            # JSON booleans only (null is PEFT's unset, False): bool("false") would be True and change the scaling
            "use_rslora": _given(d, "use_rslora", False),
            "use_dora": _given(d, "use_dora", False),
            "rank_pattern": _given(d, "rank_pattern", {}),
            "alpha_pattern": _given(d, "alpha_pattern", {}),
            "modules_to_save": d.get("modules_to_save"),
            "trainable_token_indices": d.get("trainable_token_indices"),
            "init": "gaussian" if init == "gaussian" else "kaiming",
        }
        if isinstance(fields["target_modules"], list):  # PEFT writes a set: the order means nothing
            fields["target_modules"] = sorted(fields["target_modules"], key=str)
        fields.update(overrides)
        return cls(**fields)


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"LowRankConfig.{name}={_shown(value)} is not valid: expected {allowed}.")


def _flag(value: Any) -> Any:
    """True / False for a bool or 0 / 1 (earlier saves wrote `"use_rslora": 1`); anything else as it is, to be
    refused by the caller (a string such as "false" is not False)."""
    return bool(value) if not isinstance(value, str) and value in (0, 1) else value


def _given(d: dict[str, Any], key: str, default: Any) -> Any:
    """`d[key]`, or `default` where the key is missing or null (PEFT's "unset")."""
    value = d.get(key)
    return default if value is None else value


def _shown(value: Any) -> str:
    """`repr(value)`, cut to a length an error message can hold (a config may hold a megabyte in one field)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text):,} characters)"


def _token_list(ids: Any) -> bool:
    """A non-empty list of distinct non-negative ints."""
    return (isinstance(ids, (list, tuple)) and len(ids) > 0 and len(set(ids)) == len(ids)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))


def _positive(value: Any, kind: type | tuple[type, ...]) -> bool:
    """A finite number of `kind` (bools excluded) in (0, MAX_RANK_OR_ALPHA]."""
    return (not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
            and 0 < value <= MAX_RANK_OR_ALPHA)
