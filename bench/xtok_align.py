"""What aligning a step's responses with a teacher of another tokenizer costs (teacher.tokenizer=cross), against
the teacher's own pass over the same sequences: GSM8K answers as the student's samples (its tokenizer's
segmentation, eos-ended), a step's worth of them through `CrossTokens.view` (bytes of the sampled ids, the
teacher's rendering of the prompt and tokenisation of the text, the spans, the shares) on rank 0's one core.

    python bench/xtok_align.py [--sequences 64 --teacher metaspace|byte_level --reps 5]

Tokenizers trained here on GSM8K's own text (student: byte-level, 1000 merges; teacher: SentencePiece-style or
byte-level with 600, so spans are not all 1:1); the teacher pass: a tiny Llama (hidden 256 x 4 layers, fp32,
one thread) forward over the teacher's ids of the same sequences, the least of a step's model work.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_opd.demo.tiny import tiny_hf_config, train_tokenizer  # noqa: E402
from megatron_opd.trainer.cross_rows import CrossTokens  # noqa: E402

GSM8K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "gsm8k",
                     "train.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--teacher", choices=("metaspace", "byte_level"), default="metaspace")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in open(GSM8K)][:2000]
    corpus = [row["question"] + "\n" + row["answer"] for row in rows]
    student = train_tokenizer(corpus, vocab_size=1000)
    teacher = train_tokenizer(corpus, vocab_size=600, kind=args.teacher)
    batch = rows[:args.sequences]
    prompts = [[{"role": "user", "content": row["question"]}] for row in batch]
    pairs = [(student.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
              student.encode(row["answer"], add_special_tokens=False) + [student.eos_token_id])
             for p, row in zip(prompts, batch)]
    pairs = [(student.encode(text, add_special_tokens=False), response) for text, response in pairs]
    cross = CrossTokens(student, teacher, "student", "teacher", "teacher")
    align_s, view = [], None
    for _ in range(args.reps):
        started = time.perf_counter()
        view, metrics = cross.view(prompts, pairs, [None] * len(pairs), [True] * len(pairs))
        align_s.append(time.perf_counter() - started)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_hf_config("llama", vocab_size=len(teacher), hidden_size=256,
                                                            intermediate_size=512, num_attention_heads=4)).eval()
    length = max(len(p) + len(r) for p, r in view.pairs)
    ids = torch.tensor([p + r + [0] * (length - len(p) - len(r)) for p, r in view.pairs])
    forward_s = []
    with torch.no_grad():
        for _ in range(args.reps):
            started = time.perf_counter()
            model(ids)
            forward_s.append(time.perf_counter() - started)
    tokens = sum(len(r) for _, r in pairs)
    align, forward = statistics.median(align_s), statistics.median(forward_s)
    print(f"{args.sequences} GSM8K answers ({tokens} student tokens, {tokens / args.sequences:.0f} a response), "
          f"teacher {args.teacher}: aligned share {metrics['xtok/aligned_share']:.3f}, 1:1 "
          f"{metrics['xtok/one_to_one_share']:.3f}, split boundaries {metrics['xtok/split_boundary_share']:.3f}, "
          f"shared vocabulary {metrics['xtok/shared_vocab_share']:.3f}")
    print(f"alignment {align * 1000:.1f} ms ({args.sequences / align:.0f} sequences/s); the tiny teacher's forward "
          f"over the same {length}-token rows {forward * 1000:.1f} ms; ratio {align / forward:.2f}")


if __name__ == "__main__":
    main()
