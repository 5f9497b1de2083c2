"""A stock TRL DPO script, turned into QLoRA by the two marked lines: the reference model is the policy with its
adapters disabled (no second copy of the base is loaded).

    python examples/dpo_qlora.py                       # a tiny built-in model and preference pairs, offline, CPU
    python examples/dpo_qlora.py --model PATH_OR_ID    # your causal LM and its tokenizer

Remove the two marked lines and it is TRL's full fine-tuning DPO, with a second model as the reference.
"""

import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

import hf_lowrank  # <- added line 1 of 2

hf_lowrank.enable(r=16, lora_alpha=32, lora_dropout=0.0)  # <- added line 2 of 2

PAIRS = [  # (prompt, chosen, rejected): small built-in preference data, so the example runs offline
    ("The baker", " bakes bread at dawn.", " sells old shoes."),
    ("A cat", " sleeps in the warm sun.", " drives a red truck."),
    ("The river", " runs down to the sea.", " writes a long letter."),
    ("In winter", " the snow falls on the hills.", " the fish climb the trees."),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="base model folder or Hub id (default: a tiny built-in Llama)")
    parser.add_argument("--output_dir", default="dpo-qlora-output")
    parser.add_argument("--max_steps", type=int, default=30)
    cli = parser.parse_args()

    model_path = cli.model
    if model_path is None:  # a tiny random Llama and tokenizer written locally
        from hf_lowrank.data import build_default_base

        model_path = str(build_default_base(f"{cli.output_dir}/base-model"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)  # unchanged: the hook quantizes and injects
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] * 8)

    args = DPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=4,
                     learning_rate=5e-3, logging_steps=5, save_steps=15, max_length=64, report_to="none",
                     use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()  # the adapter only (PEFT's format), and a model card naming DPO
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    print(f"rewards/margins: {margins[0]:.3f} -> {margins[-1]:.3f}; adapter in {cli.output_dir}")


if __name__ == "__main__":
    main()
