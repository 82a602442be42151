"""The main job's walk with an environment, on test_opd_demo's FakeStages (~5 s): every conversation of the
task has the environment (the on-policy rollouts, the teacher's samples), the SFT runs train without the
environment's parts (the teacher without its detour turns too, the cold start on its own conversation
rows), the arms share one budget of the task's own steps (conversations x steps), and the report gives the
task's verdicts and measures beside the other tasks'."""
import json
import os

import pytest

from omegaconf import OmegaConf

from megatron_opd.demo import experiment
from megatron_opd.demo.opd_demo import main
from megatron_opd.demo.report import metrics_of
from megatron_opd.demo.settings import ARMS, BATCH, PAIRS, PRESETS, SAMPLES, TASKS
from tests.demo.test_opd_demo import FakeStages, _fewer_prompts, _log_jobs

TURNS = TASKS["walk_env"].conversations


def _config(out: str, *run: str):
    return OmegaConf.load(os.path.join(out, "walk_env", *run, "hydra", "config.yaml"))


def test_the_walk_env_runs_have_the_environment_and_train_without_its_parts(tmp_path, monkeypatch):
    _fewer_prompts(monkeypatch)
    stages, generated = FakeStages(monkeypatch), []

    def in_turns(model_dir, rows, limits):
        result = stages.evaluate(model_dir, rows, limits)
        del result["own_samples"]["wrong_note"]  # the environment keeps the notes
        return {**result, "overshoot_recovery": round(result["recovery"] - 0.07, 3)}

    def cli(module, *overrides):
        if module == "megatron_opd.generate":
            generated.append(dict(o.split("=", 1) for o in overrides))
        return stages.cli(module, *overrides)

    monkeypatch.setattr(experiment, "evaluate_conversations", in_turns)
    monkeypatch.setattr(experiment, "cli", cli)
    _log_jobs(monkeypatch)
    out = str(tmp_path / "demo")
    main(["--out", out, "--tasks", "walk,walk_env"])  # the demo preset: walk_env's arms take steps of their own
    steps = PRESETS["demo"].steps_of("walk_env")
    assert steps != PRESETS["demo"].steps

    data = os.path.join(out, "walk_env", "data")
    teacher, student = _config(out, "teacher"), _config(out, "seed0", "student")
    assert teacher.data.train_files == os.path.join(data, "teacher_train.jsonl")
    assert teacher.data.response_skip_key == student.data.response_skip_key == "extra_info.skip"
    assert student.data.train_files == os.path.join(data, "student_train.jsonl")
    runs = {arm: _config(out, "seed0", experiment.SLUGS[arm]) for arm in ARMS}
    assert runs["on-policy"].rollout.env == TURNS.env and runs["on-policy"].data.response_skip_key is None
    assert (runs["on-policy"].rollout.max_turns, runs["on-policy"].rollout.max_turn_tokens) == (
        TURNS.max_turns, TURNS.max_turn_tokens)
    for arm in ("SeqKD", "supervised KD"):
        assert runs[arm].rollout.env is None and runs[arm].data.response_skip_key == "extra_info.env_spans"
    for cfg in [teacher, student, *runs.values()]:
        assert cfg.rollout.response_length == TASKS["walk_env"].response_tokens
        assert cfg.actor.max_tokens_per_micro_batch == TASKS["walk_env"].micro_batch_tokens
    budget = {cfg.trainer.total_steps * cfg.data.train_batch_size * cfg.rollout.n for cfg in runs.values()}
    assert budget == {steps * BATCH * SAMPLES}  # conversations x steps, every arm alike
    in_walk_env = [given["output"].startswith(os.path.join(out, "walk_env", "")) for given in generated]
    [samples] = [given for given, ours in zip(generated, in_walk_env) if ours]
    assert (samples["rollout.env"], int(samples["rollout.max_turns"]), int(samples["rollout.max_turn_tokens"])) == (
        TURNS.env, TURNS.max_turns, TURNS.max_turn_tokens)
    assert int(samples["max_prompts"]) * int(samples["rollout.n"]) == steps * BATCH * SAMPLES
    # the single-turn walk's runs keep theirs
    walk = OmegaConf.load(os.path.join(out, "walk", "seed0", "onpolicy", "hydra", "config.yaml"))
    assert walk.rollout.env is None and walk.actor.max_tokens_per_micro_batch is None
    assert walk.trainer.total_steps == PRESETS["demo"].steps
    assert OmegaConf.load(os.path.join(out, "walk", "teacher", "hydra", "config.yaml")).data.response_skip_key == (
        "extra_info.detours")
    assert [given.get("rollout.env") for given, ours in zip(generated, in_walk_env) if not ours] == [None]

    summary = json.load(open(os.path.join(out, "report", "summary.json")))["tasks"]
    assert list(summary) == ["walk", "walk_env"]
    walk_env = summary["walk_env"]
    # the demo scores the first of walk_env's test prompts, every model alike; the walk all of its own
    scored = PRESETS["demo"].test_prompts_of("walk_env")
    assert scored < TASKS["walk_env"].test_prompts and PRESETS["full"].test_prompts_of("walk_env") is None
    assert {e["prompts"] for e in [walk_env["teacher"], *walk_env["students"].values(),
                                   *(s for arm in walk_env["arms"].values() for s in arm["seeds"].values())]} == {scored}
    assert summary["walk"]["teacher"]["prompts"] == 50
    # the demo runs on where a premise fails (--full stops), and says so
    assert walk_env["teacher_recovers"] == {"recovery": 0.97, "overshoot_recovery": 0.9, "required": 0.95,
                                            "holds": False}
    assert walk_env["steps"] == steps
    assert all(seed["steps"] == steps for arm in walk_env["arms"].values() for seed in arm["seeds"].values())
    assert set(walk_env["verdicts"]) == {f"{a} vs {b}" for a, b in PAIRS}
    assert metrics_of("walk_env") == ("success", "shortest", "recovery", "overshoot_recovery")
    assert all(set(by_metric) == set(metrics_of("walk_env")) for by_metric in walk_env["verdicts"].values())
    tables = open(os.path.join(out, "report", "tables.md")).read()
    assert "| walk: own samples at the rollout temperature | wrong move | wrong note |\n|---|---|---|\n" in tables
    assert "| walk_env: own samples at the rollout temperature | wrong move |\n|---|---|\n| teacher | 0.100 |\n" in tables


@pytest.mark.parametrize("overshoot, stops", [(0.95, False), (0.94, True)])
def test_a_strict_run_stops_when_the_teacher_does_not_recover_from_either_slip(tmp_path, capsys, overshoot, stops):
    """--full's premise: every forced slip of the task, each at RECOVERY_REQUIRED; the evaluation that fails
    it is removed so that a re-run evaluates the teacher trained longer."""
    exp = experiment.Experiment(str(tmp_path), PRESETS["full"], ["walk_env"], strict=True)
    path = exp.eval_path("walk_env", None, "teacher")

    def evaluate(model_dir, task, split, out_file):
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        with open(out_file, "w") as f:
            json.dump({"success": 0.9, "recovery": 0.99, "overshoot_recovery": overshoot}, f)

    exp.evaluate = evaluate
    if stops:
        with pytest.raises(SystemExit, match=r"teacher's overshoot_recovery 0\.940 below 0\.95; remove"):
            exp.evaluate_teacher("walk_env")
        assert not os.path.exists(path)
    else:
        exp.evaluate_teacher("walk_env")
        assert os.path.exists(path)
    printed = capsys.readouterr().out
    assert f"overshoot recovery after a forced wrong move {overshoot:.3f} (required 0.95): " + (
        "DOES NOT HOLD" if stops else "holds") in printed
    assert "recovery after a forced wrong move 0.990 (required 0.95): holds" in printed
