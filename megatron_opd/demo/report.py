"""The comparison's report, from the jobs' own files only: every number here is read from an evaluation's
json, a run's metrics.jsonl or the jobs' wall times. Per task a table, a plot, and in summary.json the
per-seed numbers and a verdict (verdict.py) for each arm pair and metric."""
import json
import os
import statistics

from megatron_opd.demo.settings import ARMS, BATCH, PAIRS, RECOVERY_REQUIRED, SAMPLES, TASKS
from megatron_opd.demo.verdict import paired_interval, verdict

def metrics_of(task: str) -> tuple:
    return ("success", "shortest", *TASKS[task].recoveries) if TASKS[task].walk else ("success",)


def load_eval(path: str) -> dict:
    """An evaluation's numbers (its responses stay in its own file)."""
    return {k: v for k, v in json.load(open(path)).items() if k != "responses"}


def run_tokens(metrics_path: str) -> tuple[int, int]:
    """(optimizer steps, response tokens trained on) of a run, from its metrics.jsonl."""
    steps = [json.loads(line) for line in open(metrics_path) if '"response_length/mean"' in line]
    return len(steps), round(sum(s["response_length/mean"] * BATCH * SAMPLES for s in steps))


def _arm(exp, task: str, arm: str, seconds: dict) -> dict:
    seeds = {}
    for seed in range(exp.preset.seeds):
        lr = exp.chosen_lr(task, arm) if exp.grid_run(seed) else None
        run_dir = exp.run_dir(task, seed, arm, lr)
        steps, tokens = run_tokens(os.path.join(run_dir, "metrics.jsonl"))
        seeds[seed] = {**load_eval(exp.eval_path(task, seed, exp.run_name(arm))), "steps": steps,
                       "sequences": steps * BATCH * SAMPLES,
                       "teacher_scored_tokens": 0 if arm == "SeqKD" else tokens,
                       "teacher_sampled_tokens": 0 if arm == "on-policy" else tokens,
                       "wall_s": seconds.get(f"{task}/seed{seed}/{exp.run_name(arm, lr)}"),
                       "teacher_sampling_wall_s": (None if arm == "on-policy"
                                                   else seconds.get(f"{task}/seed{seed}/samples"))}
    means = {m: statistics.fmean(s[m] for s in seeds.values()) for m in metrics_of(task)}
    return {"lr": exp.chosen_lr(task, arm), "seeds": seeds, "mean": means}


def _verdicts(task: str, arms: dict) -> dict:
    out = {}
    for first, second in PAIRS:
        out[f"{first} vs {second}"] = by_metric = {}
        for metric in metrics_of(task):
            a = [arms[first]["seeds"][s][metric] for s in sorted(arms[first]["seeds"])]
            b = [arms[second]["seeds"][s][metric] for s in sorted(arms[second]["seeds"])]
            if len(a) < 2:
                by_metric[metric] = {"verdict": "undecided", "why": "one seed: no interval (run --full)",
                                     "difference": a[0] - b[0]}
                continue
            mean, low, high = paired_interval(a, b)
            by_metric[metric] = {"verdict": verdict(a, b), "difference": mean, "interval_95": [low, high],
                                 "seeds_ahead": sum(x > y for x, y in zip(a, b))}
    return out


def task_summary(exp, task: str, seconds: dict) -> dict:
    arms = {arm: _arm(exp, task, arm, seconds) for arm in ARMS}
    summary = {"steps": exp.preset.steps_of(task), "teacher": load_eval(exp.eval_path(task, None, "teacher")),
               "students": {s: load_eval(exp.eval_path(task, s, "student")) for s in range(exp.preset.seeds)},
               "arms": arms, "verdicts": _verdicts(task, arms)}
    if TASKS[task].walk:
        recoveries = {m: summary["teacher"][m] for m in TASKS[task].recoveries}
        summary["teacher_recovers"] = {**recoveries, "required": RECOVERY_REQUIRED,
                                       "holds": min(recoveries.values()) >= RECOVERY_REQUIRED}
    if len(exp.preset.lr_grid) > 1:
        summary["lr_choice"] = json.load(open(exp.lr_choice_path(task)))
    return summary


def _mean(values, digits: int = 3) -> str:
    values = list(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"


def markdown(task: str, summary: dict) -> str:
    """The task's table and verdicts as markdown (report/tables.md, the README's tables)."""
    metrics = metrics_of(task)
    lines = [f"| {task} | lr | " + " | ".join(metrics) + " | teacher-scored tokens | wall s |",
             "|---" * (len(metrics) + 4) + "|",
             "| teacher | | " + " | ".join(f"{summary['teacher'][m]:.3f}" for m in metrics) + " | | |",
             "| student at start | | " + " | ".join(_mean(s[m] for s in summary["students"].values())
                                                  for m in metrics) + " | | |"]
    for arm, numbers in summary["arms"].items():
        seeds = list(numbers["seeds"].values())
        lines.append(f"| {arm} | {numbers['lr']:g} | " + " | ".join(_mean(s[m] for s in seeds) for m in metrics)
                     + f" | {_mean((s['teacher_scored_tokens'] for s in seeds), 0)} | "
                       f"{_mean((s['wall_s'] or 0 for s in seeds), 0)} |")
    if TASKS[task].walk:  # what each model's own samples look like: the states on-policy training visits
        kinds = list(summary["teacher"]["own_samples"])  # in turns a wrong move only: the environment keeps notes
        lines += ["", f"| {task}: own samples at the rollout temperature | "
                  + " | ".join(kind.replace("_", " ") for kind in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        rows = [("teacher", [summary["teacher"]]), ("student at start", list(summary["students"].values()))]
        for name, evals in rows + [(arm, list(numbers["seeds"].values())) for arm, numbers in summary["arms"].items()]:
            lines.append(f"| {name} | " + " | ".join(_mean(e["own_samples"][kind] for e in evals)
                                                     for kind in kinds) + " |")
    lines += ["", "| " + task + ": first vs second | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for pair, by_metric in summary["verdicts"].items():
        cells = []
        for metric in metrics:
            v = by_metric[metric]
            interval = (f" [{v['interval_95'][0]:+.3f}, {v['interval_95'][1]:+.3f}]" if "interval_95" in v else "")
            cells.append(f"{v['verdict']} ({v['difference']:+.3f}{interval})")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(task: str, summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics_of(task)
    walk = TASKS[task].walk
    figure, axes = plt.subplots(1, 2 if walk else 1, figsize=(11 if walk else 6, 4), squeeze=False)
    bars = axes[0][0]
    width = 0.8 / len(ARMS)
    for k, arm in enumerate(ARMS):
        seeds = summary["arms"][arm]["seeds"].values()
        for m, metric in enumerate(metrics):
            x = m + (k - (len(ARMS) - 1) / 2) * width
            bars.bar(x, summary["arms"][arm]["mean"][metric], width, color=f"C{k}", label=arm if m == 0 else None)
            bars.scatter([x] * len(seeds), [s[metric] for s in seeds], color="black", s=8, zorder=3)
    bars.axhline(summary["teacher"]["success"], color="gray", linestyle="--", label="teacher (success)")
    bars.axhline(statistics.fmean(s["success"] for s in summary["students"].values()), color="gray", linestyle=":",
                 label="student at start (success)")
    bars.set(xticks=range(len(metrics)), xticklabels=metrics, ylim=(0, 1), title=f"{task}: held-out, dots = seeds")
    bars.legend(fontsize=8)
    if walk:
        lines = axes[0][1]
        for k, arm in enumerate(ARMS):
            seeds = list(summary["arms"][arm]["seeds"].values())
            distances = sorted(seeds[0]["success_by_distance"], key=int)
            lines.plot([int(d) for d in distances], [statistics.fmean(s["success_by_distance"][d] for s in seeds)
                                                     for d in distances], marker="o", color=f"C{k}", label=arm)
        by_distance = summary["teacher"]["success_by_distance"]
        lines.plot([int(d) for d in by_distance], list(by_distance.values()), color="gray", linestyle="--",
                   label="teacher")
        lines.set(xlabel="distance to the goal", ylabel="success", ylim=(0, 1.02), title="success against distance")
        lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(exp, seconds: dict) -> dict:
    os.makedirs(exp.path("report"), exist_ok=True)
    summary = {"preset": {"seeds": exp.preset.seeds, "lr_grid": list(exp.preset.lr_grid), "steps": exp.preset.steps,
                          "task_steps": dict(exp.preset.task_steps), "sequences_per_step": BATCH * SAMPLES},
               "tasks": {}}
    for task in exp.tasks:
        summary["tasks"][task] = task_summary(exp, task, seconds)
        summary["tasks"][task]["plot"] = plot(task, summary["tasks"][task], exp.path("report", f"{task}.png"))
    with open(exp.path("report", "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    tables = "\n".join(markdown(task, summary["tasks"][task]) for task in exp.tasks)
    with open(exp.path("report", "tables.md"), "w") as f:
        f.write(tables)
    print(f"\nheld-out scores (mean ± sd over {exp.preset.seeds} seed(s)), teacher-scored tokens and wall seconds per "
          f"run; verdicts with the paired 95% interval\n\n{tables}\nsummary: {exp.path('report', 'summary.json')}, "
          f"plots: {', '.join(summary['tasks'][task]['plot'] for task in exp.tasks)}")
    return summary
