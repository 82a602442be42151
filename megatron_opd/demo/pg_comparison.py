"""OPD's policy-gradient form against the direct loss and a task reward, on the main job's arithmetic task
(its teacher and cold-start students, shared with runs/demo). Per seed, four arms of the same steps, each on
8 prompts x 4 samples at temperature 0.7, at the lr (cosine to a tenth of it) that seed 0's runs chose from
LR_GRID by validation success (the mean of the last 3 validations):
- direct:        the full-vocabulary forward KL's own gradient (the main job's on-policy arm);
- KL (pg):       the policy gradient, each sampled token's reverse KL (at the sampling temperature) its
                 advantage;
- KL + reward:   that plus the GSM8K-format reward minus its prompt's mean (reward.coef 1);
- reward (GRPO): the reward alone (kl_loss_coef 0). The teacher is still scored; its seconds are left out of
                 this arm's wall time.
Validation success (greedy, 200 held-out prompts) every 25 steps; test success (400) at the end of each
chosen run; a table and a plot of success against steps and against wall time (mean over seeds). A job
whose output exists is skipped: remove <out>/arithmetic/pg to run the arms again.

Run: .venv/bin/python -m megatron_opd.demo.pg_comparison [--seeds 3] [--steps 200] [--out runs/demo]
(17 minutes on 2 cores once the main job's teacher and students exist)
"""
import argparse
import dataclasses
import json
import os

from megatron_opd.demo.cli_runner import cli
from megatron_opd.demo.experiment import Experiment
from megatron_opd.demo.jobs import Job, run_jobs
from megatron_opd.demo.opd_demo import task_jobs
from megatron_opd.demo.pg_report import curve, write_pg_report
from megatron_opd.demo.settings import KL, KL_TEMPERATURE, LANES, PRESETS, TEMPERATURE

TASK = "arithmetic"
PROMPTS, SAMPLES = 8, 4  # the group baseline needs several samples of a prompt; 32 sequences a step, as the main job
VAL_EVERY = 25
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
CHOICE_VALIDATIONS = 3  # an lr's score: the mean of its run's last validations
PG = ["actor.policy_loss=pg", "actor.kl_loss_type=kl"]
REWARD = ["reward.fn=gsm8k", "reward.coef=1.0"]
PG_ARMS = {"direct": ("direct", [f"actor.kl_loss_type={KL}", f"actor.kl_temperature={KL_TEMPERATURE}"]),
        "KL (pg)": ("kl_pg", PG),
        "KL + reward": ("kl_reward", PG + REWARD),
        "reward (GRPO)": ("grpo", PG + REWARD + ["actor.kl_loss_coef=0"])}
NO_TEACHER = ("reward (GRPO)",)  # arms whose wall time leaves out the teacher's pass (timing_s/teacher)


def run_dir(exp: Experiment, seed: int, arm: str, lr: float = None) -> str:
    """Seed 0 runs every lr of the grid, each in a directory of its own (lr None: the chosen one)."""
    if seed == 0:
        lr = chosen_lr(exp, arm) if lr is None else lr
        return exp.path(TASK, "pg", "seed0", f"{PG_ARMS[arm][0]}_lr{lr:g}")
    return exp.path(TASK, "pg", f"seed{seed}", PG_ARMS[arm][0])


def choice_file(exp: Experiment) -> str:
    return exp.path(TASK, "pg", "lr_choice.json")


def chosen_lr(exp: Experiment, arm: str) -> float:
    return json.load(open(choice_file(exp)))[arm]


def choose_lrs(exp: Experiment) -> None:
    """Each arm's lr: the grid value whose seed-0 run has the best late validation success (ties: smaller)."""
    scores = {}
    for arm in PG_ARMS:
        for lr in LR_GRID:
            late = curve(os.path.join(run_dir(exp, 0, arm, lr), "metrics.jsonl"), False)["val_success"]
            scores.setdefault(arm, {})[lr] = sum(late[-CHOICE_VALIDATIONS:]) / len(late[-CHOICE_VALIDATIONS:])
    choice = {arm: max(sorted(by_lr), key=lambda lr: by_lr[lr]) for arm, by_lr in scores.items()}
    with open(choice_file(exp), "w") as f:
        json.dump({**choice, "validation_success": scores}, f, indent=1)


def eval_file(exp: Experiment, seed: int, arm: str) -> str:
    return exp.path(TASK, "pg", "eval", f"seed{seed}", f"{PG_ARMS[arm][0]}.test.json")


def train_arm(exp: Experiment, seed: int, arm: str, steps: int, lr: float = None) -> None:
    lr = chosen_lr(exp, arm) if lr is None else lr
    cli("megatron_opd.train", *exp.common(TASK, run_dir(exp, seed, arm, lr), seed),
        f"student.path={exp.path(TASK, f'seed{seed}', 'student', 'hf')}",
        f"teacher.path={exp.path(TASK, 'teacher', 'hf')}", f"data.train_batch_size={PROMPTS}", f"rollout.n={SAMPLES}",
        f"rollout.temperature={TEMPERATURE}", f"actor.micro_batch_size={PROMPTS * SAMPLES}", f"actor.optim.lr={lr}",
        "actor.optim.lr_decay=cosine", f"actor.optim.min_lr={lr / 10}", "actor.optim.warmup_steps=10",
        f"trainer.total_steps={steps}", f"trainer.test_freq={VAL_EVERY}", *PG_ARMS[arm][1])


def jobs(exp: Experiment, seeds: int, steps: int) -> list[Job]:
    """The main job's data, teacher, cold-start students and their test success (done already when they
    exist), seed 0's grid, the lr choice, then the other seeds; a test evaluation of each chosen run."""
    shared = {f"{TASK}/data", f"{TASK}/teacher"} | {f"{TASK}/seed{s}/{job}" for s in range(seeds)
                                                     for job in ("student", "eval/student")}
    out = [job for job in task_jobs(exp, TASK) if job.name in shared]
    choice = f"{TASK}/pg/lr_choice"
    grid = []
    for arm in PG_ARMS:
        for lr in LR_GRID:
            grid.append(f"{TASK}/pg/seed0/{PG_ARMS[arm][0]}_lr{lr:g}")
            out.append(Job(grid[-1], lambda a=arm, r=lr: train_arm(exp, 0, a, steps, r),
                           os.path.join(run_dir(exp, 0, arm, lr), "hf", "config.json"), (f"{TASK}/seed0/student",)))
    out.append(Job(choice, lambda: choose_lrs(exp), choice_file(exp), tuple(grid)))
    for seed in range(seeds):
        for arm in PG_ARMS:
            name = f"{TASK}/pg/seed{seed}/{PG_ARMS[arm][0]}"
            if seed:
                out.append(Job(name, lambda s=seed, a=arm: train_arm(exp, s, a, steps),
                               os.path.join(run_dir(exp, seed, arm), "hf", "config.json"),
                               (f"{TASK}/seed{seed}/student", choice)))
            out.append(Job(f"{name}/test", lambda s=seed, a=arm: exp.evaluate(
                os.path.join(run_dir(exp, s, a), "hf"), TASK, "test", eval_file(exp, s, a)), eval_file(exp, seed, arm),
                (name if seed else choice,)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    exp = Experiment(args.out, dataclasses.replace(PRESETS["full"], seeds=args.seeds, steps=args.steps), [TASK])
    seconds = run_jobs(jobs(exp, args.seeds, args.steps), LANES, exp.path(TASK, "pg", "seconds.json"))
    summary = write_pg_report(exp.path(TASK, "pg", "report"), {
        arm: [(os.path.join(run_dir(exp, s, arm), "metrics.jsonl"), eval_file(exp, s, arm)) for s in range(args.seeds)]
        for arm in PG_ARMS}, NO_TEACHER, json.load(open(choice_file(exp))),
        [exp.eval_path(TASK, s, "student") for s in range(args.seeds)])
    print(json.dumps({arm: (row["lr"], row["test_success"]) for arm, row in summary["arms"].items()}, indent=1))
    print(f"job seconds: {sum(seconds.values()):.0f}")


if __name__ == "__main__":
    main()
