"""Padding in a step's micro-batches on GSM8K's length mix: fixed-size micro-batches (every sequence padded to
the step's longest) against token-budget ones (`actor.max_tokens_per_micro_batch`: grouped by length, each
padded to its own longest), through the trainer's own batching code.

    python bench/micro_batch_padding.py [--gsm8k ../shared/data/gsm8k] [--steps 50] [--batch 64]

A step: --batch GSM8K training questions (chat-templated with the project's tiny tokenizer, as the trainer
sees them) each with a worked answer from another random question as its response (lengths as a student's
samples would vary), micro-batches of 4 sequences, and a token budget of 4 x the 90th-percentile sequence
length. Reported: padded tokens / all tokens, mean over --steps random steps.
"""
import argparse
import json
import os
import random

import torch

from megatron_opd.data.chat import encode_prompt
from megatron_opd.demo.tiny import train_tokenizer
from megatron_opd.models.batch import build_batch

GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k")
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MICRO_BATCH = 4


def padding(micro_batches) -> float:
    total = sum(mb.tokens.numel() for mb in micro_batches)
    return 1 - sum(int(mb.lengths.sum()) for mb in micro_batches) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", default=GSM8K)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    tokenizer = train_tokenizer()
    rows = [json.loads(line) for line in open(os.path.join(args.gsm8k, "train.jsonl"))]
    rng = random.Random(0)
    fixed, budget = [], []
    for _ in range(args.steps):
        step = rng.sample(rows, args.batch)
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"{r['question']} {INSTRUCTION}"}])
                   for r in step]
        responses = [tokenizer(rng.choice(rows)["answer"], add_special_tokens=False)["input_ids"] for _ in step]
        batch = build_batch(prompts, responses, tokenizer.pad_token_id, torch.device("cpu"))
        lengths = sorted(batch.lengths.tolist())
        fixed.append(padding(batch.micro_batches(MICRO_BATCH)))
        budget.append(padding(batch.token_budget_micro_batches(MICRO_BATCH * lengths[int(0.9 * len(lengths))], 1)))
    print(f"GSM8K train, {args.steps} steps of {args.batch} sequences, tiny tokenizer: padded share of the tokens")
    print(f"  fixed micro-batches of {MICRO_BATCH} (padded to the step's longest): {sum(fixed) / len(fixed):.1%}")
    print(f"  token budget of {MICRO_BATCH} x p90 length (padded within each):   {sum(budget) / len(budget):.1%}")


if __name__ == "__main__":
    main()
