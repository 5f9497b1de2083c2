"""The built-in default for `hf-lowrank train`: a small bundled corpus, a tokenizer trained on it, a tiny Llama.

Nothing here touches the network, so the main job runs offline on a laptop CPU.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CORPUS = "tiny_corpus.txt"


def corpus_text() -> str:
    return resources.files("hf_lowrank").joinpath("data", CORPUS).read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = 512, text: str | None = None):
    """A byte-level BPE tokenizer trained on `text` (the bundled corpus by default) in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text or corpus_text()).splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_default_base(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Llama (4 blocks × 256, vocab 512) and its tokenizer to `folder` (once); returns its
    absolute path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder).expanduser().resolve()  # absolute: adapters trained on it record a base that resolves
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():  # from any folder
        return folder
    tokenizer = build_tokenizer(512)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
