"""A plain Hugging Face Trainer script, turned into QLoRA by the two marked lines.

    python examples/train_qlora.py                       # a tiny built-in model and corpus, offline, CPU is fine
    python examples/train_qlora.py --model PATH_OR_ID    # your causal LM (a Hub id needs the network)

Remove the two marked lines and it is the same script fine-tuning every weight in full precision.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_lowrank  # <- added line 1 of 2

hf_lowrank.enable(r=16, lora_alpha=32)  # <- added line 2 of 2: NF4 base + LoRA, paged AdamW, adapter-only saves


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="base model folder or Hub id (default: a tiny built-in Llama)")
    parser.add_argument("--output_dir", default="qlora-output")
    parser.add_argument("--max_steps", type=int, default=60)
    cli = parser.parse_args()

    model_path = cli.model
    if model_path is None:  # a tiny random Llama and tokenizer written locally, so the example runs offline
        from accelerate import PartialState

        from hf_lowrank.data import build_default_base

        with PartialState().main_process_first():  # under a multi-process launch, rank 0 writes it first
            model_path = str(build_default_base(f"{cli.output_dir}/base-model"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)  # unchanged: the hook quantizes and injects

    from hf_lowrank.data import corpus_text

    ids = tokenizer(corpus_text(), return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)
    train = [{"input_ids": b, "labels": b} for b in blocks]

    args = TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=10, save_steps=30, activation_checkpointing=True, report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    trainer.save_model()  # writes adapter_model.safetensors + adapter_config.json (PEFT's format)


if __name__ == "__main__":
    main()
