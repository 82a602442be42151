"""The main job's plumbing, at a few steps per stage: every stage runs through the CLIs, the report has
every row, the budget rule holds, the test problems are held out, and a stage re-runs alone."""
import json
import os

import pyarrow.parquet as pq

from megatron_opd.data import questions
from megatron_opd.demo.opd_demo import main
from megatron_opd.demo.settings import BATCH, SAMPLES


def test_demo_stages_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    main(["--out", out, "--teacher-steps", "20", "--student-steps", "5", "--distill-steps", "4"])
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    for row in ("teacher", "student before", "on-policy", "off-policy"):
        assert 0.0 <= summary[row]["accuracy"] <= 1.0 and summary[row]["kl"] >= 0.0
    assert summary["student before"]["kl"] > 0.0 and os.path.getsize(summary["plot"]) > 10_000
    onpolicy = [json.loads(line) for line in open(os.path.join(out, "onpolicy", "metrics.jsonl"))]
    budget = sum(r["response_length/mean"] * BATCH * SAMPLES for r in onpolicy if "actor/kl_loss" in r)
    kept = open(os.path.join(out, "offpolicy", "teacher_samples_budget.jsonl")).read().count("\n")
    assert 0 < kept and kept * 2 <= budget  # every kept sample holds at least one token and an end-of-sequence
    train, test = (questions(pq.read_table(os.path.join(out, "data", f"{split}.parquet")).to_pylist())
                   for split in ("train", "test"))
    assert len(test) > 100 and not train & test  # held out
    printed = capsys.readouterr().out
    assert "on-policy closed" in printed

    main(["--out", out, "--stages", "teacher,report"])
    assert "[teacher] exists, skipped" in capsys.readouterr().out
