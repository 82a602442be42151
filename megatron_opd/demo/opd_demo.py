"""The main job on the embedded default: where on-policy distillation wins and where it does not, on CPU.

Three tasks: two-step arithmetic, where a slip is fatal; walk-to-goal with slack, where a slip can be
recovered from and the teacher (trained on walks with masked detours) knows how, while its own samples never
show a detour; and the same walk in turns with an environment that keeps the position and answers each move
with the way left (walk_env), where a slip is a wrong move and nothing else. Per seed, the same teacher and
cold-start student go through three arms at an equal budget (on-policy KD, SeqKD, supervised KD;
experiment.py), each at the lr the same grid chose for it on the validation split; every trained model is
scored on held-out prompts (evaluate.py, evaluate_env.py) and the arms are compared by the statistics fixed
in verdict.py (report.py).

The demo (default) runs one seed at one lr in about 13 minutes on 2 cores; --full runs 5 seeds with the lr
grid. Outputs under --out (runs/demo, --full: runs/full); a job whose output exists is skipped (re-running
resumes), --force re-runs all.

Run: .venv/bin/python -m megatron_opd.demo.opd_demo [--full] [--out DIR]
"""
import argparse
import dataclasses
import os
import time

from megatron_opd.demo.experiment import Experiment
from megatron_opd.demo.jobs import Job, run_jobs
from megatron_opd.demo.report import write_report
from megatron_opd.demo.settings import ARMS, LANES, PRESETS, TASKS
from megatron_opd.demo.tasks import write_task


def _hf(directory: str) -> str:
    return os.path.join(directory, "hf", "config.json")


def task_jobs(exp: Experiment, task: str) -> list[Job]:
    data, teacher, checked = f"{task}/data", f"{task}/teacher", f"{task}/eval/teacher"
    jobs = [Job(data, lambda: write_task(task, exp.path(task, "data")), exp.path(task, "data", "init_teacher",
                                                                                  "config.json")),
            Job(teacher, lambda: exp.teacher(task), _hf(exp.path(task, "teacher")), (data,), exp.teacher_steps(task)),
            Job(checked, lambda: exp.evaluate_teacher(task), exp.eval_path(task, None, "teacher"), (teacher,))]
    grid = len(exp.preset.lr_grid) > 1
    val_evals = []
    for seed in range(exp.preset.seeds):
        prefix = f"{task}/seed{seed}"
        student, samples = f"{prefix}/student", f"{prefix}/samples"
        jobs += [Job(student, lambda s=seed: exp.student(task, s), _hf(exp.path(task, f"seed{seed}", "student")),
                     (data,), exp.student_steps(task)),
                 Job(f"{prefix}/eval/student", lambda s=seed: exp.evaluate(
                     exp.path(task, f"seed{s}", "student", "hf"), task, "test", exp.eval_path(task, s, "student")),
                     exp.eval_path(task, seed, "student"), (student,)),
                 Job(samples, lambda s=seed: exp.samples(task, s),
                     exp.path(task, f"seed{seed}", "teacher_samples.jsonl"), (teacher,))]
        for arm in ARMS:
            inputs = (student, checked) if arm == "on-policy" else (student, checked, samples)
            if exp.grid_run(seed):
                for lr in exp.preset.lr_grid:
                    run = f"{prefix}/{exp.run_name(arm, lr)}"
                    jobs.append(Job(run, lambda s=seed, a=arm, r=lr: exp.arm(task, s, a, r),
                                    _hf(exp.run_dir(task, seed, arm, lr)), inputs, exp.preset.steps_of(task)))
                    val_file = exp.eval_path(task, seed, exp.run_name(arm, lr), "val")
                    jobs.append(Job(f"{run}/val", lambda s=seed, a=arm, r=lr, f=val_file: exp.evaluate(
                        os.path.join(exp.run_dir(task, s, a, r), "hf"), task, "val", f), val_file, (run,)))
                    val_evals.append(f"{run}/val")
                trained = (f"{task}/lr_choice",)
            else:
                run = f"{prefix}/{exp.run_name(arm)}"
                jobs.append(Job(run, lambda s=seed, a=arm: exp.arm(task, s, a), _hf(exp.run_dir(task, seed, arm)),
                                inputs + ((f"{task}/lr_choice",) if grid else ()), exp.preset.steps_of(task)))
                trained = (run,)
            test_file = exp.eval_path(task, seed, exp.run_name(arm))
            jobs.append(Job(f"{prefix}/eval/{exp.run_name(arm)}", lambda s=seed, a=arm, f=test_file: exp.evaluate(
                exp.trained(task, s, a), task, "test", f), test_file, trained))
    if grid:
        jobs.append(Job(f"{task}/lr_choice", lambda: exp.choose_lrs(task), exp.lr_choice_path(task), tuple(val_evals)))
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where its jobs and report go (default runs/demo, --full: runs/full)")
    parser.add_argument("--full", action="store_true", help="5 seeds and the lr grid (see settings.PRESETS)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--force", action="store_true", help="re-run jobs whose outputs exist")
    parser.add_argument("--seeds", type=int, help="override the preset's seed count")
    parser.add_argument("--steps", type=int, help="override the preset's optimizer steps per arm (every task's)")
    parser.add_argument("--lr-grid", help="override the preset's lr grid, e.g. 1e-3,3e-3")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the teacher's and the cold start's steps (a quick look: 0.05)")
    args = parser.parse_args(argv)
    preset = PRESETS["full" if args.full else "demo"]
    overrides = {"seeds": args.seeds, "steps": args.steps, "task_steps": () if args.steps else None,
                 "lr_grid": tuple(map(float, args.lr_grid.split(","))) if args.lr_grid else None}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; choose from {','.join(TASKS)}")
    # apart by default: a job whose output exists is skipped, and the demo's runs are not the comparison's
    exp = Experiment(args.out or ("runs/full" if args.full else "runs/demo"), preset, tasks, scale=args.scale,
                     strict=args.full)
    started = time.perf_counter()
    per_task = [task_jobs(exp, task) for task in tasks]
    # every task's data, teacher and its check first: the teachers are the longest jobs, the rest waits on them
    jobs = [job for head in per_task for job in head[:3]] + [job for rest in per_task for job in rest[3:]]
    seconds = run_jobs(jobs, LANES, exp.path("seconds.json"), args.force)
    write_report(exp, seconds)
    print(f"finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
