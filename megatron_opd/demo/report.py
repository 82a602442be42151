"""The demo's measurements and report: held-out accuracy (greedy, opd-generate) and KL(student || teacher)
on the student's own samples (the first, pre-update step of a one-step opd-train run) for every model,
then a table, summary.json and a plot of accuracy and KL against the teacher-token budget."""
import json
import os
import re
import shutil

MODELS = (("teacher", "teacher"), ("student before", "student"), ("on-policy", "onpolicy"),
          ("off-policy", "offpolicy"))


def _accuracy(demo, cli, name: str) -> float:
    printed = cli("megatron_opd.generate", f"model.path={demo.path(name, 'hf')}",
                  f"data.val_files={demo.path('data', 'test.parquet')}", "data.max_prompt_length=64",
                  f"output={demo.path('report', name + '_test.jsonl')}", "rollout.response_length=24")
    return float(re.search(r"accuracy ([\d.]+)", printed).group(1))


def _kl(demo, cli, name: str) -> float:
    from megatron_opd.demo.opd_demo import BATCH, SAMPLES

    save_dir = demo.path("report", f"kl_{name}")
    cli("megatron_opd.train", *demo.common(save_dir), f"student.path={demo.path(name, 'hf')}",
        f"teacher.path={demo.path('teacher', 'hf')}", f"data.train_batch_size={BATCH}", f"rollout.n={SAMPLES}",
        "rollout.temperature=1.0", "actor.kl_loss_type=reverse", f"actor.micro_batch_size={BATCH * SAMPLES}",
        "trainer.total_steps=1", "trainer.export_hf=false", "trainer.resume=never", "data.seed=12345")
    first = json.loads(open(os.path.join(save_dir, "metrics.jsonl")).readline())
    return first["actor/kl_loss"]


def _curve(path: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in map(json.loads, open(path)) if key in r]


def _plot(demo, summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, name in (("on-policy", "onpolicy"), ("off-policy", "offpolicy")):
        points = _curve(demo.path(name, "metrics.jsonl"), "val/accuracy")
        last = max(step for step, _ in points) or 1
        accuracy_axis.plot([s / last for s, _ in points], [a for _, a in points], marker="o", label=label)
    accuracy_axis.axhline(summary["teacher"]["accuracy"], color="gray", linestyle="--", label="teacher")
    accuracy_axis.set(xlabel="fraction of the teacher-token budget", ylabel="held-out accuracy", ylim=(0, 1))
    accuracy_axis.legend()
    steps = _curve(demo.path("onpolicy", "metrics.jsonl"), "actor/kl_loss")
    kl_axis.plot([s for s, _ in steps], [k for _, k in steps], label="on-policy (training batches)")
    kl_axis.axhline(summary["off-policy"]["kl"], color="C1", linestyle="--", label="off-policy, final")
    kl_axis.set(xlabel="on-policy step", ylabel="KL(student || teacher), student samples", yscale="log")
    kl_axis.legend()
    figure.tight_layout()
    path = demo.path("report", "demo.png")
    figure.savefig(path, dpi=120)
    return path


def measure_and_report(demo) -> dict:
    from megatron_opd.demo.opd_demo import cli

    shutil.rmtree(demo.path("report"), ignore_errors=True)
    os.makedirs(demo.path("report"))
    summary = {}
    for label, name in MODELS:
        summary[label] = {"accuracy": _accuracy(demo, cli, name), "kl": 0.0 if name == "teacher" else _kl(demo, cli, name)}
    gap = summary["teacher"]["accuracy"] - summary["student before"]["accuracy"]
    closed = (summary["on-policy"]["accuracy"] - summary["student before"]["accuracy"]) / gap if gap > 0 else float("nan")
    summary["gap_closed_by_on_policy"] = closed
    summary["plot"] = _plot(demo, summary)
    with open(demo.path("report", "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{'model':16} {'held-out accuracy':>18} {'KL(student||teacher)':>21}")
    for label, _ in MODELS:
        print(f"{label:16} {summary[label]['accuracy']:18.3f} {summary[label]['kl']:21.4f}")
    print(f"on-policy closed {closed:.0%} of the teacher-student accuracy gap; plot: {summary['plot']}")
    return summary
