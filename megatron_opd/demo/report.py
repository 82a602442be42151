"""The demo's measurements and report: held-out accuracy (greedy, opd-generate) and the distillation
divergence (the on-policy run's KL kind and temperature) on the student's own samples (the first, pre-update
step of a one-step opd-train run) for every model, then a table, summary.json and a plot of accuracy and KL
against the teacher-token budget."""
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

from megatron_opd.demo.cli_runner import cli, share_cores
from megatron_opd.demo.settings import BATCH, KL, LANES, RESPONSE_TOKENS, SAMPLES, TEMPERATURE

MODELS = (("teacher", "teacher"), ("student before", "student"), ("on-policy", "onpolicy"),
          ("off-policy", "offpolicy"))


def _accuracy(demo, name: str) -> float:
    printed = cli("megatron_opd.generate", f"model.path={demo.path(name, 'hf')}",
                  f"data.val_files={demo.path('data', 'test.parquet')}", "data.max_prompt_length=64",
                  f"output={demo.path('report', name + '_test.jsonl')}", f"rollout.response_length={RESPONSE_TOKENS}")
    return float(re.search(r"accuracy ([\d.]+)", printed).group(1))


def _kl(demo, name: str) -> float:
    save_dir = demo.path("report", f"kl_{name}")
    cli("megatron_opd.train", *demo.common(save_dir), f"student.path={demo.path(name, 'hf')}",
        f"teacher.path={demo.path('teacher', 'hf')}", f"data.train_batch_size={BATCH}", f"rollout.n={SAMPLES}",
        f"rollout.temperature={TEMPERATURE}", f"actor.kl_loss_type={KL}", f"actor.micro_batch_size={BATCH * SAMPLES}",
        "trainer.total_steps=1", "trainer.export_hf=false", "trainer.resume=never", "data.seed=12345")
    first = json.loads(open(os.path.join(save_dir, "metrics.jsonl")).readline())
    return first["actor/kl_loss"]


def kl_label() -> str:
    return f"{KL} KL at T={TEMPERATURE}, student's samples"


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
    for color, label in (("C0", "on-policy"), ("C1", "off-policy")):
        kl_axis.axhline(summary[label]["kl"], color=color, linestyle="--", label=f"{label}, final")
    kl_axis.set(xlabel="on-policy step", ylabel=kl_label(), yscale="log")
    kl_axis.legend()
    figure.tight_layout()
    path = demo.path("report", "demo.png")
    figure.savefig(path, dpi=120)
    return path


def measure_and_report(demo) -> dict:
    shutil.rmtree(demo.path("report"), ignore_errors=True)
    os.makedirs(demo.path("report"))

    def measure(name: str) -> dict:
        share_cores(LANES)
        return {"accuracy": _accuracy(demo, name), "kl": 0.0 if name == "teacher" else _kl(demo, name)}

    with ThreadPoolExecutor(LANES) as pool:
        summary = dict(zip((label for label, _ in MODELS), pool.map(measure, (name for _, name in MODELS))))
    gap = summary["teacher"]["accuracy"] - summary["student before"]["accuracy"]
    gain = summary["on-policy"]["accuracy"] - summary["student before"]["accuracy"]
    summary["gap_closed_by_on_policy"] = closed = gain / gap if gap > 0 else float("nan")
    summary["plot"] = _plot(demo, summary)
    with open(demo.path("report", "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{'model':16} {'held-out accuracy':>18}   {kl_label()}")
    for label, _ in MODELS:
        print(f"{label:16} {summary[label]['accuracy']:18.3f}   {summary[label]['kl']:.4f}")
    print(f"on-policy closed {closed:.0%} of the teacher-student accuracy gap; plot: {summary['plot']}")
    return summary
