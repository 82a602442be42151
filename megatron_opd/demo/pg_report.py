"""The policy-gradient comparison's report: per arm, validation success against steps and against the
run's wall time (mean over seeds, each seed's curve kept), test success at the end; summary.json, table.md
and curves.png."""
import json
import os

from megatron_opd.demo.report import load_eval


def curve(metrics_path: str, leave_out_teacher: bool) -> dict:
    """Validation success at each validated step and the run's wall seconds up to it (step 0: before any)."""
    steps, success, wall, clock, last = [], [], [], 0.0, 0
    for line in map(json.loads, open(metrics_path)):
        clock += line.get("timing_s/step", 0.0) - (line.get("timing_s/teacher", 0.0) if leave_out_teacher else 0.0)
        last = line["step"]
        if "val/accuracy" in line:
            steps.append(line["step"])
            success.append(line["val/accuracy"])
            wall.append(clock)
    return {"steps": steps, "val_success": success, "wall_s": wall, "s_per_step": clock / max(last, 1)}


def _mean(rows: list) -> list:
    return [sum(column) / len(column) for column in zip(*rows)]


def arm_summary(runs: list, leave_out_teacher: bool) -> dict:
    curves = [curve(metrics, leave_out_teacher) for metrics, _ in runs]
    test = [load_eval(path)["success"] for _, path in runs]
    return {"steps": curves[0]["steps"], "val_success": _mean([c["val_success"] for c in curves]),
            "wall_s": _mean([c["wall_s"] for c in curves]), "val_success_seeds": [c["val_success"] for c in curves],
            "test_success": {"mean": sum(test) / len(test), "seeds": test},
            "s_per_step": sum(c["s_per_step"] for c in curves) / len(curves)}


def markdown(summary: dict) -> str:
    arms = summary["arms"]
    steps = next(iter(arms.values()))["steps"]
    shown = [s for s in steps if s % (2 * (steps[1] - steps[0])) == 0] if len(steps) > 2 else steps
    head = ["arm", "lr", *[f"val @{s}" for s in shown], "test (mean)", "test per seed", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = summary["start_test_success"]
    lines.append(f"| cold start | | {' | '.join([''] * len(shown))} | {start['mean']:.3f} | "
                 f"{' '.join(f'{v:.3f}' for v in start['seeds'])} | |")
    for arm, row in arms.items():
        val = [f"{row['val_success'][steps.index(s)]:.3f}" for s in shown]
        seeds = " ".join(f"{v:.3f}" for v in row["test_success"]["seeds"])
        lines.append(f"| {arm} | {row['lr']:g} | {' | '.join(val)} | {row['test_success']['mean']:.3f} | {seeds} | "
                     f"{row['s_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm, row in summary["arms"].items():
        by_step.plot(row["steps"], row["val_success"], marker="o", markersize=3, label=arm)
        by_time.plot(row["wall_s"], row["val_success"], marker="o", markersize=3, label=arm)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall seconds (2-core CPU; GRPO without the teacher's pass)")
    by_step.set_ylabel(f"validation success (mean of {summary['seeds']} seeds)")
    by_step.legend()
    figure.suptitle("arithmetic: policy-gradient OPD, direct OPD and a task reward")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_pg_report(out_dir: str, runs: dict, no_teacher: tuple, lr_choice: dict, start: list) -> dict:
    """`runs`: arm -> per seed (metrics.jsonl, test eval json); `lr_choice`: arm -> lr, and the grid's scores;
    `start`: per seed the cold-start student's test eval."""
    start = [load_eval(path)["success"] for path in start]
    summary = {"seeds": len(start), "lr_grid_validation": lr_choice["validation_success"],
               "start_test_success": {"mean": sum(start) / len(start), "seeds": start},
               "arms": {arm: {"lr": lr_choice[arm], **arm_summary(paths, arm in no_teacher)}
                        for arm, paths in runs.items()}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown(summary))
    plot(summary, os.path.join(out_dir, "curves.png"))
    return summary
