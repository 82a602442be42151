"""The main job's pipeline at a few steps per job (one task, two seeds, a two-value lr grid): every arm has
the same budget, the lr each arm got is the grid value its validation runs scored best, the fresh teacher
samples are used once each, the held-out prompts are held out, every number in the report equals the
stage's own log (scores recomputed from the saved responses, tokens from the runs' metrics), the verdicts
follow from the per-seed numbers, and a second run resumes without redoing a job."""
import json
import os

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from megatron_opd.demo.arithmetic import questions
from megatron_opd.data.scorers import score_response
from megatron_opd.demo.opd_demo import main
from megatron_opd.demo.report import run_tokens
from megatron_opd.demo.settings import ARMS, BATCH, PAIRS, SAMPLES
from megatron_opd.demo.verdict import verdict

STEPS, GRID = 3, (1e-3, 3e-3)


def _config(run_dir):
    return OmegaConf.load(os.path.join(run_dir, "hydra", "config.yaml"))


def test_demo_pipeline_invariants(tmp_path, capsys):
    out = str(tmp_path / "demo")
    argv = ["--out", out, "--tasks", "walk", "--seeds", "2", "--steps", str(STEPS), "--lr-grid", "1e-3,3e-3",
            "--scale", "0.02"]
    main(argv)
    summary = json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]["walk"]
    data = os.path.join(out, "walk", "data")
    splits = {s: pq.read_table(os.path.join(data, f"{s}.parquet")).to_pylist() for s in ("train", "val", "test")}
    train, val, test = (questions(splits[s]) for s in ("train", "val", "test"))
    assert len(splits["test"]) >= 400 and not (train & test or train & val or val & test)

    validation = summary["lr_choice"]["validation_success"]
    for arm in ARMS:
        scores = {float(lr): score for lr, score in validation[arm].items()}
        assert summary["arms"][arm]["lr"] == max(sorted(scores), key=scores.get) and set(scores) == set(GRID)
        for seed in ("0", "1"):
            numbers = summary["arms"][arm]["seeds"][seed]
            run_dir = os.path.join(out, "walk", f"seed{seed}", {"on-policy": "onpolicy", "SeqKD": "seqkd",
                                                                "supervised KD": "supkd"}[arm])
            run_dir += f"_lr{summary['arms'][arm]['lr']:g}" if seed == "0" else ""
            cfg = _config(run_dir)
            # the same budget in every arm: steps x sequences per step
            assert cfg.trainer.total_steps == numbers["steps"] == STEPS
            assert cfg.data.train_batch_size * cfg.rollout.n == BATCH * SAMPLES == numbers["sequences"] // STEPS
            assert cfg.actor.optim.lr == summary["arms"][arm]["lr"]
            tokens = run_tokens(os.path.join(run_dir, "metrics.jsonl"))[1]
            assert numbers["teacher_scored_tokens"] == (0 if arm == "SeqKD" else tokens)
            if arm != "on-policy":  # fresh teacher samples, each used once
                assert cfg.data.train_files == os.path.join(out, "walk", f"seed{seed}", "teacher_samples.jsonl")
                assert open(cfg.data.train_files).read().count("\n") == STEPS * BATCH * SAMPLES
                assert not cfg.data.shuffle
            name = os.path.basename(run_dir).split("_")[0]
            saved = json.load(open(os.path.join(out, "walk", "eval", f"seed{seed}", f"{name}.test.json")))
            rows = splits["test"]
            rescored = sum(score_response(r["data_source"], text, r["reward_model"]["ground_truth"])
                           for r, text in zip(rows, saved["responses"])) / len(rows)
            assert numbers["success"] == saved["success"] == rescored
    for first, second in PAIRS:
        for metric, judged in summary["verdicts"][f"{first} vs {second}"].items():
            a, b = ([summary["arms"][arm]["seeds"][s][metric] for s in ("0", "1")] for arm in (first, second))
            assert judged["verdict"] == verdict(a, b)
    assert os.path.getsize(summary["plot"]) > 10_000
    capsys.readouterr()

    main(argv)
    printed = capsys.readouterr().out
    jobs = [line for line in printed.splitlines() if line.startswith("[walk/")]
    assert jobs and all(line.endswith("] done before, skipped") for line in jobs), jobs
    assert json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]["walk"]["arms"] == summary["arms"]
