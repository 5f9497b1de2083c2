"""A stock TRL GRPO script with a rule-based reward, turned into QLoRA by the two marked lines: with beta > 0 the
KL reference is the policy with its adapters disabled (no second copy of the base is loaded).

    python examples/grpo_qlora.py                       # a tiny built-in model and prompts, offline, CPU
    python examples/grpo_qlora.py --model PATH_OR_ID    # your causal LM and its tokenizer

Remove the two marked lines and it is TRL's full fine-tuning GRPO, with a second model as the reference.
"""

import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import hf_lowrank  # <- added line 1 of 2

hf_lowrank.enable(r=16, lora_alpha=32, lora_dropout=0.0)  # <- added line 2 of 2

PROMPTS = ["The baker", "A cat", "The river", "In winter", "One day", "The old man", "At night", "A bird"]


def reward_vowels(completions, **kwargs):
    """A verifiable reward: the share of vowels in the completion (any rule-based check works the same way)."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="base model folder or Hub id (default: a tiny built-in Llama)")
    parser.add_argument("--output_dir", default="grpo-qlora-output")
    parser.add_argument("--max_steps", type=int, default=20)
    cli = parser.parse_args()

    model_path = cli.model
    if model_path is None:  # a tiny random Llama and tokenizer written locally
        from hf_lowrank.data import build_default_base

        model_path = str(build_default_base(f"{cli.output_dir}/base-model"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)  # unchanged: the hook quantizes and injects
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS] * 4)

    args = GRPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=16, learning_rate=1e-2, beta=0.05, logging_steps=5,
                      save_steps=10, report_to="none", use_cpu=not torch.cuda.is_available(),
                      bf16=torch.cuda.is_available())
    trainer = GRPOTrainer(model=model, args=args, train_dataset=data, reward_funcs=[reward_vowels],
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"mean reward: {rewards[0]:.3f} -> {rewards[-1]:.3f}; adapter in {cli.output_dir}")


if __name__ == "__main__":
    main()
