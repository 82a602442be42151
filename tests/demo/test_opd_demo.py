"""The main job (opd_demo.main) in two tests, about a minute together on 2 idle cores (and where it writes).

test_job_graph_lr_choice_budget_verdicts_and_resume (~5 s): the real data, job graph, lr choice, report and
verdicts on FakeStages, which stand in for the CLI runs and the evaluations (walk, five seeds, a three-value
lr grid): every job runs once, after the jobs it needs, and no stage runs before its inputs exist; each
arm's lr is the grid value its validation scored best; every run has the same budget (steps x sequences)
and its config says so; the report's numbers are the evaluations' and the runs' metrics; off-policy arms
train on fresh teacher samples, each once; the verdicts follow from the per-seed numbers; a second run
resumes without redoing a job.

test_every_stage_for_real_and_the_report_equals_their_logs (~50 s, ~80 s on busy cores: six CLI start-ups):
walk, one seed, one lr, two steps, every stage run for real; the held-out prompts are held out, and the
report's numbers equal the stages' own logs: success the saved evaluation's and a rescoring of its responses,
teacher-scored tokens the runs' metrics, the budget the runs' configs, and the fresh teacher samples
(steps x BATCH prompts x SAMPLES) are what the off-policy arms train on.
"""
import collections
import dataclasses
import itertools
import json
import os

import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import megatron_opd.generate  # noqa: F401  (registers the schema FakeStages composes generate's config on)
from megatron_opd.data.scorers import score_response
from megatron_opd.demo import experiment, jobs, opd_demo, tasks
from megatron_opd.demo.arithmetic import questions
from megatron_opd.demo.experiment import SLUGS
from megatron_opd.demo.opd_demo import main
from megatron_opd.demo.report import metrics_of, run_tokens
from megatron_opd.demo.settings import ARMS, BATCH, PAIRS, SAMPLES, VAL_PROMPTS
from megatron_opd.demo.verdict import VERDICTS, verdict
from megatron_opd.train import CONFIG_DIR

SEEDS, STEPS, GRID = 5, 2, (1e-3, 3e-3, 1e-2)
# FakeStages' validation success of each arm's seed-0 run per lr: each arm's best is a different grid value
# and its worst another (SeqKD ties 1e-3 with 3e-3: the smaller wins), so a wrong choice shows.
VALIDATION = {"on-policy": {1e-3: 0.30, 3e-3: 0.55, 1e-2: 0.10},
              "SeqKD": {1e-3: 0.48, 3e-3: 0.48, 1e-2: 0.20},
              "supervised KD": {1e-3: 0.35, 3e-3: 0.40, 1e-2: 0.44}}
CHOSEN = {"on-policy": 3e-3, "SeqKD": 1e-3, "supervised KD": 1e-2}
# FakeStages' test metrics per arm, seeds 0..4, so that the pairs' verdicts differ by pair and metric
# (all four of VERDICTS occur): on-policy is ahead of SeqKD in success, behind it in shortest, and on par
# with supervised KD in success and recovery.
TEST = {"on-policy": {"success": (0.62, 0.64, 0.61, 0.66, 0.63), "shortest": (0.20, 0.25, 0.22, 0.21, 0.24),
                      "recovery": (0.50, 0.52, 0.51, 0.49, 0.50)},
        "SeqKD": {"success": (0.40, 0.45, 0.42, 0.41, 0.44), "shortest": (0.50, 0.52, 0.49, 0.51, 0.50),
                  "recovery": (0.30, 0.70, 0.20, 0.80, 0.45)},
        "supervised KD": {"success": (0.62, 0.645, 0.605, 0.665, 0.625), "shortest": (0.40, 0.10, 0.35, 0.05, 0.30),
                          "recovery": (0.51, 0.53, 0.50, 0.50, 0.51)}}
FIXED = {"teacher": dict(success=0.90, shortest=0.80, recovery=0.97),  # the walk premise holds
         "student": dict(success=0.10, shortest=0.05, recovery=0.10)}


def _given(*path: str) -> None:
    assert os.path.exists(os.path.join(*path)), f"{os.path.join(*path)}: missing"


class FakeStages:
    """A fake of the demo's expensive stages, installed with monkeypatch: the CLI runs of megatron_opd.train
    and megatron_opd.generate (cli_runner.cli, as experiment.py calls it) and the evaluations
    (evaluate.evaluate, as Experiment.evaluate calls it). Each leaves what the real stage leaves, so the real
    job graph, lr choice, report and verdicts run unchanged on it: a train run its hydra/config.yaml (the
    CLI's composed config with the overrides it was given), one metrics.jsonl line per trainer.total_steps
    and hf/config.json (its done file); a generate run max_prompts x rollout.n rows in its output; an
    evaluation the scores of VALIDATION, TEST and FIXED for the model it was given (no responses). Like the
    real stages, each fails when a model or data file it is given is missing: a job run before its inputs
    exist shows."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(experiment, "cli", self.cli)
        monkeypatch.setattr(experiment, "evaluate", self.evaluate)
        self._runs = itertools.count()
        # composed once: hydra's compose keeps global state and the jobs run in threads
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            self._composed = {"megatron_opd.train": compose("distillation_trainer"),
                              "megatron_opd.generate": compose("generation")}

    def _config(self, module: str, overrides) -> DictConfig:
        """The config `module` runs with: its composed config with the overrides merged in, their keys and
        types checked against its schema."""
        return OmegaConf.merge(self._composed[module], OmegaConf.from_dotlist(list(overrides)))

    def cli(self, module: str, *overrides: str) -> str:
        cfg = self._config(module, overrides)
        if module == "megatron_opd.generate":
            _given(cfg.model.path, "config.json")
            _given(cfg.data.val_files)
            os.makedirs(os.path.dirname(cfg.output), exist_ok=True)
            with open(cfg.output, "w") as f:
                f.writelines(json.dumps({"response": f"sample {k}"}) + "\n"
                             for k in range(cfg.max_prompts * cfg.rollout.n))
            return ""
        for model in filter(None, (cfg.student.path, cfg.teacher.path)):
            _given(model, "config.json")
        _given(cfg.data.train_files)
        run_dir = cfg.trainer.save_dir
        os.makedirs(os.path.join(run_dir, "hydra"), exist_ok=True)
        OmegaConf.save(cfg, os.path.join(run_dir, "hydra", "config.yaml"))
        length = 10 + next(self._runs)  # a response length of each run's own: whose tokens were read shows
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": step, "response_length/mean": length + step / 4}) + "\n"
                         for step in range(1, cfg.trainer.total_steps + 1))
        os.makedirs(os.path.join(run_dir, "hf"), exist_ok=True)
        with open(os.path.join(run_dir, "hf", "config.json"), "w") as f:
            json.dump({}, f)
        return ""

    def evaluate(self, model_dir: str, rows: list[dict], max_new_tokens: int) -> dict:
        _given(model_dir, "config.json")
        *_, seed_dir, run, _ = model_dir.split(os.sep)  # .../walk/seed0/onpolicy_lr0.001/hf, .../walk/teacher/hf
        if run in FIXED:
            scores = FIXED[run]
        else:
            slug, _, lr = run.partition("_lr")
            arm = next(arm for arm, s in SLUGS.items() if s == slug)
            if rows[0]["extra_info"]["split"] == "val":
                scores = {"success": VALIDATION[arm][float(lr)], "shortest": 0.0, "recovery": 0.0}
            else:
                scores = {metric: values[int(seed_dir.removeprefix("seed"))] for metric, values in TEST[arm].items()}
        return {**scores, "prompts": len(rows), "success_by_distance": {6: scores["success"], 14: scores["success"]},
                "own_samples": {"wrong_move": 0.1, "wrong_note": 0.2}}


def _log_jobs(monkeypatch) -> tuple[dict, list]:
    """opd_demo's run_jobs, the real one on jobs that log ("start"/"end", name) as they run, in one lane and
    the last-listed ready job first: a job whose needs miss a job it reads from then runs before that job
    wherever both are ready, and its (fake) stage fails on the missing input. Returns the job graph
    ({name: needs}) and the log, both filled as main runs."""
    graph, log = {}, []

    def logged(job: jobs.Job) -> jobs.Job:
        def run():
            log.append(("start", job.name))
            job.run()
            log.append(("end", job.name))
        return dataclasses.replace(job, run=run)

    def run_jobs(job_list, _lanes, *args):  # one lane, not LANES
        graph.update((job.name, job.needs) for job in job_list)
        return jobs.run_jobs([logged(job) for job in reversed(job_list)], 1, *args)

    monkeypatch.setattr(opd_demo, "run_jobs", run_jobs)
    return graph, log


def _run_dir(out: str, seed: int, arm: str, lr: float = None) -> str:
    return os.path.join(out, "walk", f"seed{seed}", SLUGS[arm] + (f"_lr{lr:g}" if lr else ""))


def _config(run_dir: str):
    return OmegaConf.load(os.path.join(run_dir, "hydra", "config.yaml"))


def _check_budget(run_dir: str, lr: float) -> None:
    """Every arm's run: STEPS steps of BATCH x SAMPLES sequences at `lr`, as its config says."""
    cfg = _config(run_dir)
    assert cfg.trainer.total_steps == STEPS and run_tokens(os.path.join(run_dir, "metrics.jsonl"))[0] == STEPS
    assert cfg.data.train_batch_size * cfg.rollout.n == BATCH * SAMPLES and cfg.actor.optim.lr == lr


def _check_arm_run(out: str, seed: int, arm: str, run_dir: str, numbers: dict) -> None:
    """The report's budget and teacher-scored tokens of a run are its own; off-policy arms train on their
    seed's fresh teacher samples, in order, each once."""
    assert numbers["steps"] == STEPS and numbers["sequences"] == STEPS * BATCH * SAMPLES
    tokens = run_tokens(os.path.join(run_dir, "metrics.jsonl"))[1]
    assert tokens > 0 and numbers["teacher_scored_tokens"] == (0 if arm == "SeqKD" else tokens)
    cfg = _config(run_dir)
    if arm != "on-policy":
        samples = os.path.join(out, "walk", f"seed{seed}", "teacher_samples.jsonl")
        assert cfg.data.train_files == samples and not cfg.data.shuffle
        assert sum(1 for _ in open(samples)) == STEPS * BATCH * SAMPLES


def _fewer_prompts(monkeypatch) -> None:
    """Fewer prompts than the demo's: every CLI run tokenizes the train split and every evaluation decodes the
    test split. Still enough that a split not held out would share prompts with another (walk: ~1500 problems)."""
    monkeypatch.setattr(tasks, "TRAIN_PROMPTS", 500)
    monkeypatch.setattr(tasks, "TEST_PROMPTS", 50)


def test_job_graph_lr_choice_budget_verdicts_and_resume(tmp_path, monkeypatch, capsys):
    _fewer_prompts(monkeypatch)
    FakeStages(monkeypatch)
    graph, log = _log_jobs(monkeypatch)
    out = str(tmp_path / "demo")
    argv = ["--out", out, "--tasks", "walk", "--seeds", str(SEEDS), "--steps", str(STEPS),
            "--lr-grid", ",".join(map(str, GRID))]
    main(argv)

    started = [name for event, name in log if event == "start"]
    assert sorted(started) == sorted(graph)  # each job once
    for name, needs in graph.items():
        assert all(log.index(("end", need)) < log.index(("start", name)) for need in needs), name

    summary = json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]["walk"]
    validation = summary["lr_choice"]["validation_success"]
    for arm in ARMS:
        scores = {float(lr): score for lr, score in validation[arm].items()}
        assert scores == VALIDATION[arm]
        assert summary["arms"][arm]["lr"] == CHOSEN[arm] == max(sorted(scores), key=scores.get)
        for lr in GRID:
            _check_budget(_run_dir(out, 0, arm, lr), lr)
        for seed in range(SEEDS):
            numbers = summary["arms"][arm]["seeds"][str(seed)]
            run_dir = _run_dir(out, seed, arm, CHOSEN[arm] if seed == 0 else None)
            if seed:  # seed 0's runs: over the grid above
                _check_budget(run_dir, CHOSEN[arm])
            _check_arm_run(out, seed, arm, run_dir, numbers)
            saved = json.load(open(os.path.join(out, "walk", "eval", f"seed{seed}", f"{SLUGS[arm]}.test.json")))
            assert all(numbers[m] == saved[m] == TEST[arm][m][seed] for m in metrics_of("walk"))

    judged = set()
    for first, second in PAIRS:
        for metric, given in summary["verdicts"][f"{first} vs {second}"].items():
            a, b = ([summary["arms"][arm]["seeds"][str(s)][metric] for s in range(SEEDS)] for arm in (first, second))
            assert given["verdict"] == verdict(a, b), (first, second, metric)
            judged.add(given["verdict"])
    assert judged == set(VERDICTS)  # the fake's numbers give every verdict, so a swapped pair shows
    assert os.path.getsize(summary["plot"]) > 10_000
    capsys.readouterr()

    log.clear()
    main(argv)
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.endswith("] done before, skipped")]
    assert not log and sorted(line[1:line.index("]")] for line in skipped) == sorted(graph)
    assert json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]["walk"]["arms"] == summary["arms"]


def test_every_stage_for_real_and_the_report_equals_their_logs(tmp_path, monkeypatch):
    _fewer_prompts(monkeypatch)
    out = str(tmp_path / "demo")
    # the demo preset: one seed, one lr; --scale: the teacher and the cold start train one step each
    main(["--out", out, "--tasks", "walk", "--seeds", "1", "--steps", str(STEPS), "--scale", "0.001"])
    summary = json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]["walk"]
    data = os.path.join(out, "walk", "data")
    splits = {s: pq.read_table(os.path.join(data, f"{s}.parquet")).to_pylist() for s in ("train", "val", "test")}
    train, val, test = (questions(splits[s]) for s in ("train", "val", "test"))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [tasks.TRAIN_PROMPTS, VAL_PROMPTS, tasks.TEST_PROMPTS]
    assert not (train & test or train & val or val & test)
    rows = splits["test"]
    samples = [json.loads(line) for line in open(os.path.join(out, "walk", "seed0", "teacher_samples.jsonl"))]
    # steps x BATCH prompts, SAMPLES samples of each
    assert collections.Counter(collections.Counter(row["extra_info"]["index"] for row in samples).values()) == {
        SAMPLES: STEPS * BATCH}
    for arm in ARMS:
        numbers = summary["arms"][arm]["seeds"]["0"]
        run_dir = _run_dir(out, 0, arm)
        _check_budget(run_dir, summary["arms"][arm]["lr"])
        _check_arm_run(out, 0, arm, run_dir, numbers)
        saved = json.load(open(os.path.join(out, "walk", "eval", "seed0", f"{SLUGS[arm]}.test.json")))
        rescored = sum(score_response(row["data_source"], text, row["reward_model"]["ground_truth"])
                       for row, text in zip(rows, saved["responses"])) / len(rows)
        assert len(saved["responses"]) == len(rows) and numbers["success"] == saved["success"] == rescored
        assert all(numbers[m] == saved[m] for m in metrics_of("walk"))


@pytest.mark.parametrize("argv, out", [([], "runs/demo"), (["--full"], "runs/full"), (["--full", "--out", "x"], "x")])
def test_the_demo_and_the_comparison_go_to_their_own_folders_by_default(monkeypatch, argv, out):
    """A job whose output exists is skipped: the demo's runs (one seed, fewer steps) must not stand in for the
    comparison's."""
    seen = []

    class Stop(Exception):
        pass

    def experiment(path, *args, **kwargs):
        seen.append(path)
        raise Stop

    monkeypatch.setattr(opd_demo, "Experiment", experiment)
    with pytest.raises(Stop):
        opd_demo.main(argv)
    assert seen == [out]
