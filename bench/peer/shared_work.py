"""The work both trainers do in the same eager PyTorch, whatever the trainer: the teacher's forward and the
student's forward and backward on a step's batch (batch 8, each prompt + `tokens` response tokens), timed with
transformers' own models. bench/peer_trl.py reports it beside TRL's step: no trainer's step can take less.

Run (as peer_trl.py does): .venv/bin/python bench/peer/shared_work.py --student DIR --teacher DIR \
        --prompts prompts.jsonl --tokens 32 --batch 8 --threads 2      (prints one JSON line, milliseconds)
"""
import argparse
import json
import statistics
import time

import torch

WARMUP, REPS = 3, 15


def median_ms(work) -> float:
    for _ in range(WARMUP):
        work()
    times = []
    for _ in range(REPS):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--student", "--teacher", "--prompts"):
        parser.add_argument(name, required=True)
    for name in ("--tokens", "--batch", "--threads"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    prompts = [json.loads(line)["prompt_ids"] for line in open(args.prompts)][:args.batch]
    generator = torch.Generator().manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    vocab = student.config.vocab_size
    rows = [p + torch.randint(vocab, (args.tokens,), generator=generator).tolist() for p in prompts]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)

    def student_forward_backward():
        student.zero_grad(set_to_none=True)
        student(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1).mean().backward()

    print(json.dumps({"batch": list(input_ids.shape), "teacher_forward": median_ms(teacher_forward),
                      "student_forward_backward": median_ms(student_forward_backward)}))


if __name__ == "__main__":
    main()
