"""Tiny models built from configs, saved to disk once per session and loaded back through from_pretrained.

Sizes are multiples of 64 (bitsandbytes' CPU kernels want them).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=128, pad_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


def bert_config(**kw):
    from transformers import BertConfig

    base = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=128, num_labels=2)
    base.update(kw)
    return BertConfig(**base)


def save_tiny(path, kind: str, seed: int = 0, **kw) -> str:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(**kw))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(**kw))
    elif kind == "bert":
        # the classifier is not saved: loading it for sequence classification initialises a new head, as in real use
        from transformers import BertModel

        model = BertModel(bert_config(**kw), add_pooling_layer=True)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(autouse=True)
def _no_global_hook():
    """Every test starts and ends with the from_pretrained hook off."""
    import hf_lowrank

    hf_lowrank.disable()
    yield
    hf_lowrank.disable()


#: Python source that hides `peft` from the import system, as on a machine without it installed.
HIDE_PEFT = """
import sys
from importlib.machinery import PathFinder
class NoPeft(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split('.')[0] == 'peft' else PathFinder.find_spec(name, path, target)
sys.meta_path = [NoPeft if f is PathFinder else f for f in sys.meta_path]
"""


def tokens(batch: int = 2, seq: int = 16, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=g)


def drop_mask(n: int, p: float) -> torch.Tensor:
    """n i.i.d. Bernoulli(p) booleans (True = drop): the adapter dropout's positions (`drop_positions`) as a mask."""
    from hf_lowrank.layers import drop_positions

    drop = torch.zeros(n, dtype=torch.bool)
    drop[drop_positions(n, p)] = True
    return drop


class Motifs(torch.utils.data.Dataset):
    """`n` causal-LM rows of 4 repeated 8-token motifs (learnable in a few steps): input_ids = labels."""

    def __init__(self, n: int = 32):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(1, 256, (8,), generator=torch.Generator().manual_seed(i % 4)).repeat(2)
        return {"input_ids": ids, "labels": ids}


def randomize_b(model, seed: int = 1, std: float = 0.05):
    """Random B matrices (so the adapter changes the output); returns the model in eval mode."""
    import hf_lowrank

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hf_lowrank.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()
