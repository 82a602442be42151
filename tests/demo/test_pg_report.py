"""The policy-gradient comparison's numbers from its runs' files: validation curves against steps and wall
time (GRPO's without the teacher's seconds), the lr choice from seed 0's late validations, the table."""
import json

import pytest

from megatron_opd.demo import pg_comparison
from megatron_opd.demo.experiment import Experiment
from megatron_opd.demo.pg_report import curve, write_pg_report
from megatron_opd.demo.settings import PRESETS


def write_run(directory, successes, step_s=2.0, teacher_s=0.5):
    """Metrics of a run validated at steps 0, 2, 4 with `successes`; each step takes step_s, teacher_s of it
    the teacher's."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "val/accuracy": successes[0]}]
    for step in range(1, 5):
        line = {"step": step, "timing_s/step": step_s, "timing_s/teacher": teacher_s}
        if step % 2 == 0:
            line["val/accuracy"] = successes[step // 2]
        lines.append(line)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(directory / "metrics.jsonl")


def test_curves_time_and_table(tmp_path):
    metrics = write_run(tmp_path / "a", [0.2, 0.3, 0.5])
    assert curve(metrics, False) == {"steps": [0, 2, 4], "val_success": [0.2, 0.3, 0.5], "wall_s": [0.0, 4.0, 8.0],
                                     "s_per_step": 2.0}
    assert curve(metrics, True)["wall_s"] == [0.0, 3.0, 6.0]
    evals = []
    for name, success in (("a", 0.45), ("b", 0.35), ("start", 0.25)):
        evals.append(tmp_path / f"{name}.json")
        evals[-1].write_text(json.dumps({"success": success, "responses": []}))
    other = write_run(tmp_path / "b", [0.2, 0.4, 0.6])
    summary = write_pg_report(str(tmp_path / "report"), {"direct": [(metrics, str(evals[0]))],
                                                         "reward (GRPO)": [(other, str(evals[1]))]},
                              ("reward (GRPO)",), {"direct": 1e-3, "reward (GRPO)": 3e-5, "validation_success": {}},
                              [str(evals[2])])
    grpo = summary["arms"]["reward (GRPO)"]
    assert grpo["lr"] == 3e-5 and grpo["s_per_step"] == 1.5 and grpo["test_success"] == {"mean": 0.35, "seeds": [0.35]}
    table = (tmp_path / "report" / "table.md").read_text().splitlines()
    assert table[2].startswith("| cold start |") and "0.250" in table[2]
    assert table[3] == "| direct | 0.001 | 0.200 | 0.500 | 0.450 | 0.450 | 2.00 |"
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0


def test_each_arms_lr_is_the_best_late_validation_of_seed_0(tmp_path, monkeypatch):
    monkeypatch.setattr(pg_comparison, "LR_GRID", (1e-4, 1e-3))
    exp = Experiment(str(tmp_path), PRESETS["full"], ["arithmetic"])
    late = {1e-4: [0.1, 0.4, 0.4], 1e-3: [0.1, 0.5, 0.2]}  # means of the last 3 of 0, 2, 4: 0.3 and 0.267
    for arm in pg_comparison.PG_ARMS:
        for lr, successes in late.items():
            write_run(tmp_path / "arithmetic" / "pg" / "seed0" / f"{pg_comparison.PG_ARMS[arm][0]}_lr{lr:g}", successes)
    pg_comparison.choose_lrs(exp)
    choice = json.load(open(pg_comparison.choice_file(exp)))
    assert all(choice[arm] == 1e-4 for arm in pg_comparison.PG_ARMS)
    assert choice["validation_success"]["direct"]["0.001"] == pytest.approx(0.8 / 3)
    assert pg_comparison.run_dir(exp, 0, "direct").endswith("seed0/direct_lr0.0001")
