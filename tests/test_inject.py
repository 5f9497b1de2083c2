"""Injection into real transformers models loaded through from_pretrained: targets, freezing, counts, NF4, merge."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_lowrank
from hf_lowrank import LoraLinear, LowRankConfig
from tests.conftest import randomize_b, tokens

LLAMA_LINEARS = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
                 "gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128)}  # (in, out)


def _randomize_adapters(model, seed=0):
    randomize_b(model, seed, std=0.1)


def test_llama_all_linear_exact_targets_and_counts(tiny_llama):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8, quantization=None))
    names = [n for n, _ in hf_lowrank.lora_layers(model)]
    expected = [f"model.layers.{i}.{part}.{p}" for i in range(2) for part, ps in
                (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", ["gate_proj", "up_proj",
                                                                                    "down_proj"])) for p in ps]
    assert sorted(names) == sorted(expected)
    assert not isinstance(model.lm_head, LoraLinear)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert sum(trainable.values()) == 2 * sum(8 * (i + o) for i, o in LLAMA_LINEARS.values())
    assert hf_lowrank.parameter_summary(model).trainable == sum(trainable.values())


def test_target_list_suffix_and_regex(tiny_llama):
    m1 = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama,
                                    LowRankConfig(target_modules=["q_proj", "self_attn.v_proj"], quantization=None))
    assert sorted(n for n, _ in hf_lowrank.lora_layers(m1)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    m2 = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama,
                                    LowRankConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj", quantization=None,
                                                  exclude_modules=["down_proj"]))
    assert [n for n, _ in hf_lowrank.lora_layers(m2)] == ["model.layers.1.mlp.up_proj"]


def test_rank_and_alpha_patterns(tiny_llama):
    cfg = LowRankConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={r".*\.0\.mlp\.up_proj": 64},
                        quantization=None)
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, cfg)
    layers = dict(hf_lowrank.lora_layers(model))
    assert layers["model.layers.1.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(16 / 4)
    assert layers["model.layers.0.mlp.up_proj"].scaling == pytest.approx(64 / 8)
    assert layers["model.layers.1.mlp.up_proj"].scaling == pytest.approx(16 / 8)
    rs = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, cfg.replace(use_rslora=True))
    assert dict(hf_lowrank.lora_layers(rs))["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(16 / 2)


def test_nf4_base_structure_footprint_and_zero_init(tiny_llama):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8))
    layers = dict(hf_lowrank.lora_layers(model))
    assert len(layers) == 14
    for layer in layers.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        qs = layer.base_layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and qs.state2 is not None  # double quantization
        assert layer.base_layer.compute_dtype == torch.bfloat16
        assert layer.lora_A.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # no fp32 upcast
    assert model.model.norm.weight.dtype == torch.bfloat16
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    ratio = model.get_memory_footprint() / dense.get_memory_footprint()
    print(f"NF4+LoRA footprint / bf16 footprint = {ratio:.3f}")
    assert ratio < 0.9
    # zero-init B: output equals the same NF4 base without adapters
    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    for m in plain.modules():  # same kernel as ours (bitsandbytes' packed CPU path rounds differently)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)


def test_nf4_training_step_reaches_every_adapter(tiny_llama):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8))
    _randomize_adapters(model)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    for name, layer in hf_lowrank.lora_layers(model):
        assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0, name
        assert layer.base_layer.weight.grad is None


def test_gpt2_conv1d_targets_and_counts(tiny_gpt2):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_gpt2, LowRankConfig(r=4, quantization=None))
    names = sorted(n for n, _ in hf_lowrank.lora_layers(model))
    assert names == sorted(f"transformer.h.{i}.{p}" for i in range(2) for p in
                           ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    shapes = {"attn.c_attn": (128, 384), "attn.c_proj": (128, 128), "mlp.c_fc": (128, 512), "mlp.c_proj": (512, 128)}
    assert hf_lowrank.parameter_summary(model).trainable == 2 * sum(4 * (i + o) for i, o in shapes.values())
    _randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        out = model(x).logits
        with hf_lowrank.disabled_adapters(model):
            base = model(x).logits
        merged = hf_lowrank.merge(model)
        torch.testing.assert_close(merged(x).logits, out, rtol=1e-4, atol=1e-4)
    assert (out - base).abs().max() > 1e-3
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())


def test_gpt2_nf4_loads_and_trains(tiny_gpt2):
    import bitsandbytes as bnb

    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_gpt2, LowRankConfig(r=4))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert (layer.in_features, layer.out_features) == (128, 384)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    assert layer.lora_A.weight.grad is not None


def test_bert_sequence_classification_head_is_saved_module(tiny_bert):
    model = hf_lowrank.from_pretrained(AutoModelForSequenceClassification, tiny_bert, LowRankConfig(r=4))
    assert model.lowrank_config.modules_to_save == ["classifier"]
    from hf_lowrank.layers import SavedModule

    assert isinstance(model.classifier, SavedModule) and type(model.classifier.trainable) is torch.nn.Linear
    assert model.classifier.weight is model.classifier.trainable.weight  # the model sees the trained copy
    assert model.classifier.weight.requires_grad and model.classifier.weight.dtype == torch.bfloat16
    assert not model.classifier.original.weight.requires_grad  # the original stays, frozen, for disabled adapters
    names = sorted(n for n, _ in hf_lowrank.lora_layers(model))
    assert "bert.pooler.dense" in names and "bert.encoder.layer.0.attention.self.query" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.trainable.weight", "classifier.trainable.bias"} <= trainable
    assert all(n.startswith("classifier.trainable.") or ".lora_" in n for n in trainable)
    out = model(input_ids=tokens(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def test_disabled_adapters_context_restores(tiny_llama):
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8, quantization=None))
    x = tokens()
    with torch.no_grad():
        base = model(x).logits
        _randomize_adapters(model)
        adapted = model(x).logits
        with hf_lowrank.disabled_adapters(model):
            torch.testing.assert_close(model(x).logits, base)
        torch.testing.assert_close(model(x).logits, adapted)
        with pytest.raises(RuntimeError), hf_lowrank.disabled_adapters(model):
            raise RuntimeError("inside")
        torch.testing.assert_close(model(x).logits, adapted)
    assert (adapted - base).abs().max() > 1e-3


def test_merge_16bit_near_exact_and_4bit_into_16bit_copy(tiny_llama):
    m16 = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8, quantization=None))
    _randomize_adapters(m16)
    x = tokens()
    with torch.no_grad():
        ref = m16(x).logits
        merged = hf_lowrank.merge(m16)
        torch.testing.assert_close(merged(x).logits, ref, rtol=1e-4, atol=1e-4)
    m4 = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(r=8))
    _randomize_adapters(m4)
    with torch.no_grad():
        ref4 = m4(x).logits.float()
        merged4 = hf_lowrank.merge(m4)
        assert merged4.dtype == torch.bfloat16
        assert not any(type(m).__name__ == "Linear4bit" for m in merged4.modules())
        drift = (merged4(x).logits.float() - ref4).abs().max().item()
    assert drift < 0.1 * ref4.abs().max().item(), drift  # bf16 rounding of the folded weights only
    assert isinstance(m4.model.layers[0].self_attn.q_proj, LoraLinear), "merge must not change its input"


def test_errors_name_value_and_fix(tiny_llama):
    with pytest.raises(ValueError, match=r"matched no layer; linear layers in this model end in: .*q_proj"):
        hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama,
                                   LowRankConfig(target_modules=["qproj"], quantization=None))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp'.*LlamaMLP.*linear layers only"):
        hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama,
                                   LowRankConfig(target_modules=["layers.0.mlp"], quantization=None))
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(quantization=None))
    with pytest.raises(ValueError, match="inject\\(\\) once"):
        hf_lowrank.inject(model, LowRankConfig())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", 0, "LowRankConfig.r=0 is not valid: expected a positive int"),
    ("lora_alpha", -1, "LowRankConfig.lora_alpha=-1"),
    ("lora_dropout", 1.5, "LowRankConfig.lora_dropout=1.5"),
    ("quantization", "int3", r"LowRankConfig.quantization='int3' is not valid: expected one of \('nf4', 'fp4', None\)"),
    ("compute_dtype", "fp8", "LowRankConfig.compute_dtype='fp8'"),
    ("quant_storage", "int4", "LowRankConfig.quant_storage='int4'"),
    ("target_modules", [], "LowRankConfig.target_modules=\\[\\]"),
    ("target_modules", "(", "a string is a regular expression"),
    ("init", "orthogonal", "LowRankConfig.init='orthogonal'"),
    ("rank_pattern", {"q": 0}, "positive numbers"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**{field: value})


def test_hook_enabled_context_and_disable(tiny_llama):
    with hf_lowrank.enabled(r=4, quantization=None):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
        assert model.model.layers[0].self_attn.q_proj.r == 4
        assert type(model).__name__ == "LlamaForCausalLM" and hasattr(model, "generate")
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not any(True for _ in hf_lowrank.lora_layers(plain))
    hf_lowrank.enable(hf_lowrank.LowRankConfig(r=2))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert type(model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    hf_lowrank.disable()
    assert not any(True for _ in hf_lowrank.lora_layers(AutoModelForCausalLM.from_pretrained(tiny_llama)))


def test_import_is_lazy_without_bitsandbytes_or_deepspeed():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('bitsandbytes', 'deepspeed', 'peft'):
                    raise ImportError('blocked ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import hf_lowrank
        from hf_lowrank import LowRankConfig, LoraLinear
        import torch
        layer = LoraLinear(torch.nn.Linear(64, 64), r=4, alpha=8)
        assert layer(torch.randn(1, 64)).shape == (1, 64)
        heavy = [m for m in ('bitsandbytes', 'deepspeed', 'peft', 'huggingface_hub', 'transformers.trainer')
                 if m in sys.modules]
        print('heavy:', heavy)
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy: []" in out.stdout


def test_kbit_preparation_warns_for_models_without_input_embeddings(caplog):
    """transformers raises NotImplementedError from enable_input_require_grads when a model has no input embeddings:
    preparation still freezes the base and says what that means for reentrant checkpointing."""
    from hf_lowrank.quantize import prepare_for_kbit_training

    class NoEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def enable_input_require_grads(self):
            raise NotImplementedError

    model = NoEmbeddings()
    with caplog.at_level("WARNING", logger="hf_lowrank"):
        assert prepare_for_kbit_training(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert "NoEmbeddings has no input embeddings" in caplog.text and "use_reentrant" in caplog.text


def test_disabled_adapters_give_the_exact_base_with_a_loaded_head(tiny_llama, tmp_path):
    """After load_adapter of an adapter that trains lm_head (modules_to_save), disabling the adapters gives the base
    model's outputs exactly (the original head, not the trained copy); the trained model differs."""
    trained = hf_lowrank.from_pretrained(AutoModelForCausalLM, tiny_llama, LowRankConfig(
        r=4, quantization=None, modules_to_save=["lm_head"]))
    _randomize_adapters(trained)
    with torch.no_grad():
        trained.lm_head.weight.add_(torch.randn_like(trained.lm_head.weight))
    hf_lowrank.save_adapter(trained, tmp_path / "a")
    x = tokens()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        expected = base(x).logits
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    hf_lowrank.load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        adapted = model(x).logits
        with hf_lowrank.disabled_adapters(model):
            torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
            assert model.lm_head.weight is model.lm_head.original.weight
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=0)
    assert (adapted - expected).abs().max() > 1e-2


# ---- name lists from a stranger's config: PEFT's matching, each list read once ------------------------------------


class _CountedList(list):
    """A list that counts how often it is iterated (how often matching reads it)."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


class _CountedName(str):
    """A name that counts its equality tests: Python asks a str subclass on either side of `==` first, and a dict or
    set lookup only on a hash match, so the count is how often matching compared it with a module name."""

    comparisons = 0
    __hash__ = str.__hash__

    def __eq__(self, other):
        type(self).comparisons += 1
        return str.__eq__(self, other)


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "q_proj", "xq_proj", "a..b", "a.", "lm_head",
         "model.layers.0.self_attn.k_proj", "model.norm"]
ENTRIES = ["q_proj", "self_attn.q_proj", "layers.0", "0.self_attn.q_proj", "", ".b", "b", "up_proj", "mlp", "xq_proj",
           "model.layers.10.mlp.up_proj", "lm_head", "head"]


@pytest.mark.parametrize("rotation", range(len(ENTRIES)))
def test_name_lists_match_and_pick_the_first_entry_as_peft_s(rotation):
    """A list entry matches a module name equal to it or ending in "." + entry (PEFT's rule, written out here), and
    `first_entry` picks the first such entry in the list's order, whatever that order is."""
    from hf_lowrank.patterns import first_entry, name_matcher

    entries = ENTRIES[rotation:] + ENTRIES[:rotation]
    matches, first = name_matcher(entries), first_entry(entries)
    found = 0
    for name in NAMES:
        peft = [e for e in entries if name == e or name.endswith("." + e)]
        assert matches(name) == bool(peft), name
        assert first(name) == (peft[0] if peft else None), (name, entries)
        found += bool(peft)
    assert 0 < found < len(NAMES), "some names match and some do not"


def test_a_huge_target_list_is_read_once_not_once_per_module(tiny_llama):
    """target_modules / exclude_modules of 100,000 entries (a 1 MiB config from the Hub): the right layers, and each
    list read a fixed number of times (validation, one matcher), not once per module of the model (~40 here, ~1,500
    in a 70B model, where that took ~25 s)."""
    from hf_lowrank.inject import resolve_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    filler = [f"t{i:06d}" for i in range(100_000)]
    _CountedList.reads = 0
    config = LowRankConfig(quantization=None, target_modules=_CountedList([*filler, "q_proj", "mlp.up_proj"]),
                           exclude_modules=_CountedList([*filler, "layers.1.self_attn.q_proj"]))
    chosen = resolve_targets(model, config)
    assert chosen == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert _CountedList.reads <= 4, f"the lists were read {_CountedList.reads} times"


def test_trainable_token_indices_by_module_name(tiny_llama, tmp_path):
    """The dict form names embeddings as target_modules does; the first key naming a module gives its rows; a key
    that names no module is refused by name (the model unchanged); a dict of 100,000 keys costs a few comparisons,
    not one per key and module."""
    from types import SimpleNamespace

    from hf_lowrank.inject import token_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LowRankConfig(quantization=None, target_modules=["q_proj"],
                           trainable_token_indices={"embed_tokens": [5, 6], "model.embed_tokens": [7]})
    assert token_targets(model, config) == {"model.embed_tokens": [5, 6]}
    injected = hf_lowrank.inject(model, config)
    assert injected.model.embed_tokens.token_indices == [5, 6]
    with torch.no_grad():
        injected.model.embed_tokens.trainable_tokens_delta.normal_(0, 1)
    folder = hf_lowrank.save_adapter(injected, tmp_path / "adapter")  # the dict form read back: the same rows
    loaded = hf_lowrank.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), folder)
    assert loaded.model.embed_tokens.token_indices == [5, 6]
    ids = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(loaded.model.embed_tokens(ids), injected.model.embed_tokens(ids), rtol=0, atol=0)
    assert not torch.equal(injected.model.embed_tokens(ids)[0, :2], injected.model.embed_tokens.base_layer(ids)[0, :2])

    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bad = LowRankConfig(quantization=None, target_modules=["q_proj"],
                        trainable_token_indices={"embed_tokens": [5], "embed_token": [6]})
    with pytest.raises(ValueError, match="trainable_token_indices names 'embed_token', which matches no module"):
        hf_lowrank.inject(fresh, bad)
    assert not list(hf_lowrank.lora_layers(fresh)), "nothing injected"
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())

    _CountedName.comparisons = 0
    huge = {_CountedName(k): [1] for k in ["embed_tokens", *(f"t{i:06d}" for i in range(100_000))]}
    with pytest.raises(ValueError, match="names 't000000', which matches no module"):
        token_targets(fresh, SimpleNamespace(trainable_token_indices=huge))
    modules = len(list(fresh.named_modules()))
    assert _CountedName.comparisons <= modules, f"{_CountedName.comparisons:,} comparisons for {modules} modules"
    del huge["t000000"], huge["t000001"]
    with pytest.raises(ValueError, match="names 't000002'"):
        token_targets(fresh, SimpleNamespace(trainable_token_indices=huge))
