"""TRL GKDTrainer's step times on the peer benchmark's models and prompts. bench/peer_trl.py runs it in the
TRL venv (bench/.trl-venv), which holds TRL and accelerate on top of the project's torch and transformers;
every setting comes from there on the command line, so both systems share one definition of each.

Run (as peer_trl.py does): bench/.trl-venv/bin/python bench/peer/trl_gkd.py --student DIR --teacher DIR \
        --prompts prompts.jsonl --out times.json --tokens 32 --steps 30 --batch 8 --lr 1e-5 --beta 0.5 \
        --temperature 0.9 --grad-clip 1.0 --threads 2 --seed 1
Writes {"step_s": [wall seconds of each optimizer step, on_step_begin -> on_step_end], "cpu_s": [its CPU
seconds], "versions": {...}}.
"""
import argparse
import json
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--student", "--teacher", "--prompts", "--out"):
        parser.add_argument(name, required=True)
    for name in ("--tokens", "--steps", "--batch", "--threads", "--seed"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--lr", "--beta", "--temperature", "--grad-clip"):
        parser.add_argument(name, type=float, required=True)
    return parser.parse_args(argv)


def check_prompts(trainer, rows: list) -> None:
    """TRL's collator must hand generate() exactly the prompt tokens our trainer samples from."""
    batch = trainer.data_collator(rows)
    for row, ids, mask in zip(rows, batch["prompts"].tolist(), batch["prompt_attention_mask"].tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        if kept != row["prompt_ids"]:
            raise SystemExit(f"TRL's prompt tokens {kept} differ from ours {row['prompt_ids']}")


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import accelerate
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.began, self.step_s, self.cpu_s = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.began[0])
            self.cpu_s.append(time.process_time() - self.began[1])

    rows = [json.loads(line) for line in open(args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        # SFTConfig's defaults turn on gradient checkpointing (which also turns the KV cache off in GKD's
        # generate) and bf16; our trainer does neither here. Logging, saving and evaluation are off.
        config = GKDConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=args.grad_clip,
            lmbda=1.0, beta=args.beta, temperature=args.temperature, max_new_tokens=args.tokens,
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=args.seed,
            report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
                             callbacks=[timer])
        check_prompts(trainer, rows[:args.batch])
        trainer.train()
    versions = {m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate)}
    with open(args.out, "w") as f:
        json.dump({"step_s": timer.step_s, "cpu_s": timer.cpu_s, "versions": versions}, f)


if __name__ == "__main__":
    main()
