"""What the serving tests serve: a tiny Llama with a Llama-2-style tokenizer, and adapters trained on its NF4 form.

The tokenizer is what llama.cpp's model converter accepts (it refuses BPE pre-tokenizers it does not know, such as
GPT-2's): a byte-fallback BPE over "▁"-joined words, with <0x00>..<0xFF> byte tokens, saved as LlamaTokenizerFast.
Sizes are multiples of 64 (bitsandbytes' CPU kernels); head_dim 64.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    g = torch.Generator().manual_seed(0)  # random 2-7 letter words: enough distinct pairs to fill every id
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 8, (400,), generator=g)]
    text = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()  # every id the model can emit is a token
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder)


def save_base(folder: Path, seed: int = 0) -> Path:
    """The 16/32-bit base: float32 weights, tokenizer beside them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


class Motifs(torch.utils.data.Dataset):
    """Sequences of 32 tokens that repeat one of 8 random 8-token motifs: 20 steps are enough to change the
    model's greedy continuation of a motif."""

    def __init__(self, n: int = 64, seq: int = 32, low: int = 259, high: int = VOCAB):
        self.n, self.seq, self.low, self.high = n, seq, low, high

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = motif(i % 8, self.low, self.high).repeat(self.seq // 8)
        return {"input_ids": ids, "labels": ids}


def motif(k: int, low: int = 259, high: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    return torch.randint(low, high, (8,), generator=g)


def train_adapter(base: Path, out: Path, *, steps: int = 20, dtype: torch.dtype | None = None, **lora) -> Path:
    """An adapter trained for `steps` Trainer steps on the NF4 form of `base` (float32 compute), saved as it is
    (`dtype`: the dtype of the saved tensors)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_lowrank

    config = hf_lowrank.LowRankConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "quantization": "nf4",
                                         "compute_dtype": "float32", **lora})
    torch.manual_seed(0)
    model = hf_lowrank.from_pretrained(AutoModelForCausalLM, str(base), config)
    args = TrainingArguments(output_dir=str(out.parent / f".{out.name}-run"), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=steps, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Motifs()).train()
    hf_lowrank.save_adapter(model, out, dtype=dtype)
    return out
