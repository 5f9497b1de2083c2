"""init="loftq": A and B from the SVD of each layer's NF4 error (the base stays standard NF4).

Tolerances: on a tiny Llama whose weights are larger than their init (std 0.2, so NF4's error matters), with float32
compute, KL(16-bit ‖ QLoRA) at initialisation is at least 1.8× lower than with the plain init at r=32 (measured
2.4×) and lower at r=8; every layer's error ratio ‖W − (dequant(Q) + s·B·A)‖ / ‖W − dequant(Q)‖ is below 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import llama_config, tokens
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_lowrank


@pytest.fixture(scope="module")
def heavy_llama(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("heavy-llama")
    model.save_pretrained(path)
    return str(path)


def _kl(model, x, reference) -> float:
    with torch.no_grad():
        q = model.eval()(x).logits.float().log_softmax(-1)
    return F.kl_div(q, reference, log_target=True, reduction="batchmean").item()


def _load(path, **kw):
    cfg = hf_lowrank.LowRankConfig(**{"lora_alpha": 16, "lora_dropout": 0.0, "compute_dtype": "float32", **kw})
    return hf_lowrank.from_pretrained(AutoModelForCausalLM, path, cfg)


def test_loftq_starts_closer_to_the_16_bit_model(heavy_llama, tmp_path):
    x = tokens(2, 32)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(heavy_llama, dtype=torch.float32)(x).logits.float()
    reference = reference.log_softmax(-1)
    plain = _kl(_load(heavy_llama, r=32), x, reference)
    results = {}
    for r in (8, 32):
        model = _load(heavy_llama, r=r, init="loftq")
        ratios = model.loftq_error_ratios
        assert len(ratios) == 14 and all(0 < v < 1 for v in ratios.values()), ratios
        results[r] = (_kl(model, x, reference), max(ratios.values()))
    assert results[32][0] * 1.8 <= plain, (plain, results)
    assert results[8][0] < plain and results[32][1] < results[8][1], results  # more rank, less error left
    assert all(type(m.base_layer).__name__ == "Linear4bit" for _, m in hf_lowrank.lora_layers(model))

    hf_lowrank.save_adapter(model, tmp_path / "a")  # a plain LoRA file: any reader gets the same model
    loaded = hf_lowrank.load(AutoModelForCausalLM, str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=1e-5)
    import json

    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_loftq_needs_the_checkpoint_weights(tmp_path):
    from hf_lowrank.loftq import loftq_init

    with pytest.raises(ValueError, match="reads the 16-bit weights from safetensors"):
        loftq_init(torch.nn.Linear(4, 4), tmp_path)
