"""Step time and sequences/s of rollout.max_staleness 0, 1 and 2 in one run, alternating, with each phase's time
and how much of the step each side sits idle.

    python bench/async.py [--rounds 2 --steps 6 --hidden 256 --layers 4 --response 96]

Each arm is a real run (the trainer in a forked gloo worker, one process, torch at one thread per side) of a
tiny Qwen2 student (--hidden x --layers) and a co-located teacher twice its width, on the embedded engine: at
staleness 0 the step generates, then scores and updates; above 0 the engine generates the steps ahead in a
thread of the trainer's process while it scores and updates (trainer/prefetch.py). The first step of each arm
(warm-up, and nothing ahead yet) is left out. Per arm: the step's seconds, sequences/s, the trainer's wait for
samples (`timing_s/gen`), the teacher's and the update's seconds, the weight push, the engine's busy seconds per
step (`timing_s/generate`, in its thread) and each side's idle share: the trainer's = its wait / step, the
engine's = 1 - busy / step.
"""
import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_opd.parallel.quiet import quiet_known_messages  # noqa: E402

quiet_known_messages()

from hydra import compose, initialize_config_dir  # noqa: E402

from megatron_opd.config import to_config  # noqa: E402
from megatron_opd.demo.arithmetic import write_synthetic_parquet  # noqa: E402
from megatron_opd.demo.tiny import write_tiny_checkpoint  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402
from megatron_opd.train import CONFIG_DIR  # noqa: E402

SEQUENCES = 16  # per step: 8 prompts x 2 samples
STALENESS = (0, 1, 2)


def _train(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer

    return Trainer(cfg).train()


def arm(paths: dict, root: str, staleness: int, args) -> dict:
    save = tempfile.mkdtemp(dir=root)
    overrides = [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                 f"data.train_files={paths['train']}", "data.train_batch_size=8", "rollout.n=2",
                 f"rollout.response_length={args.response}", "data.max_prompt_length=128", "actor.micro_batch_size=4",
                 "actor.optim.lr=1e-4", f"trainer.total_steps={args.steps}", f"trainer.save_dir={save}",
                 "trainer.logger=[jsonl]", "trainer.export_hf=false", "trainer.save_freq=0",
                 f"rollout.max_staleness={staleness}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = to_config(compose(config_name="distillation_trainer", overrides=overrides))
    history = run_local(_train, 1, cfg, timeout_s=1800)[0][1:]
    mean = lambda key: statistics.mean(h.get(key, 0.0) for h in history)  # noqa: E731
    step = mean("timing_s/step")
    busy = mean("timing_s/generate") if staleness else mean("timing_s/gen")
    return {"step": step, "seq_s": SEQUENCES / step, "gen_wait": mean("timing_s/gen"),
            "teacher": mean("timing_s/teacher"), "update": mean("timing_s/update_actor"), "sync": mean("timing_s/sync"),
            "engine_busy": busy, "trainer_idle": mean("timing_s/gen") / step, "engine_idle": 1 - busy / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--response", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        shape = dict(num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2)
        paths = {"student": write_tiny_checkpoint(os.path.join(root, "student"), "qwen2", seed=1,
                                                  hidden_size=args.hidden, intermediate_size=4 * args.hidden, **shape),
                 "teacher": write_tiny_checkpoint(os.path.join(root, "teacher"), "qwen2", seed=2,
                                                  hidden_size=2 * args.hidden, intermediate_size=8 * args.hidden,
                                                  **shape),
                 "train": write_synthetic_parquet(os.path.join(root, "train.parquet"), 256, seed=0)}
        results = {k: [] for k in STALENESS}
        for _ in range(args.rounds):
            for staleness in STALENESS:
                results[staleness].append(arm(paths, root, staleness, args))
    print(f"student {args.hidden} x {args.layers}, teacher {2 * args.hidden} x {args.layers}, {SEQUENCES} sequences "
          f"of <= {args.response} tokens a step, {args.steps - 1} steps x {args.rounds} rounds per arm (medians)")
    print("| max_staleness | step s | sequences/s | vs 0 | trainer waits s | teacher s | update s | sync s | "
          "engine busy s | trainer idle | engine idle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(r["seq_s"] for r in results[0])
    for staleness, runs in results.items():
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"| {staleness} | {m['step']:.2f} | {m['seq_s']:.2f} | {m['seq_s'] / base:.2f}x | {m['gen_wait']:.2f} | "
              f"{m['teacher']:.2f} | {m['update']:.2f} | {m['sync']:.2f} | {m['engine_busy']:.2f} | "
              f"{m['trainer_idle']:.0%} | {m['engine_idle']:.0%} |")


if __name__ == "__main__":
    main()
