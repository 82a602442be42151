"""opd-doctor on the tiny pair (tests/conftest.py distill_setup): every check ok on the healthy pair, and each
seeded fault failing its check with a message that names it — another tokenizer, another chat template, a
temperature applied on the teacher's side only, a teacher path holding the student's weights, an engine
sampling at another temperature than the trainer assumes. The measured checks run in a forked one-process
group (tests/conftest.py run_distributed); the CLI once as a subprocess (--json, its exit code)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_opd.config import to_config
from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint
from megatron_opd.doctor import FAIL, OK, WARN, run_doctor, startup_checks
from megatron_opd.doctor.cli import main
from tests.conftest import run_distributed
from tests.runs import composed, forked

OTHER_CORPUS = ["a completely different corpus for another tokenizer", "zebra yak xylophone 0123456789"]


def overrides(setup, *extra):
    return [f"student.path={setup['student']}", f"teacher.path={setup['teacher']}",
            f"data.train_files={setup['train']}", "data.max_prompt_length=128", "trainer.device=cpu", *extra]


def config(setup, *extra):
    return to_config(composed(*overrides(setup, *extra)))


def _doctor(rank, world_size, cfg, checks, seed_fault):
    if seed_fault is not None:  # in this forked worker only
        seed_fault()
    return run_doctor(cfg, checks)


def doctor(cfg, checks, seed_fault=None):
    """The report of `checks` in a forked process of its own (a one-process gloo group)."""
    return run_distributed(_doctor, 1, cfg, checks, seed_fault)[0]


def only(report, check):
    [finding] = report.of(check)
    return finding


@pytest.fixture(scope="module")
def healthy(distill_setup):
    return doctor(config(distill_setup), ("vocab", "temperature", "memory", "self_test", "engine", "teacher_loaded",
                                          "topk_clamps"))


def test_healthy_pair_passes_every_check(healthy):
    assert [(f.check, f.status) for f in healthy.findings if f.status != OK] == []
    assert {f.check for f in healthy.findings} == {"vocab", "temperature", "memory", "self_test", "engine",
                                                   "teacher_loaded", "topk_clamps"}
    assert healthy.exit_code == 0
    assert only(healthy, "self_test").details["max_token_divergence"] <= 1e-6
    assert only(healthy, "engine").details["max_gap"] <= 1e-3


def test_another_tokenizer_fails_naming_both_paths(distill_setup, tmp_path):
    teacher = write_tiny_checkpoint(str(tmp_path / "other"), "qwen2", seed=2, tokenizer=train_tokenizer(OTHER_CORPUS))
    finding = only(run_doctor(config(distill_setup, f"teacher.path={teacher}"), ("vocab",)), "vocab")
    assert finding.status == FAIL
    assert teacher in finding.message and distill_setup["student"] in finding.message
    assert "do not share a tokenizer" in finding.message


def test_a_cross_teacher_is_reported_with_what_it_shares(distill_setup, tmp_path):
    """The vocab check reports what the tokenizers share; the student's own checks run; the teacher's, which
    read it on the student's ids, say they were not measured."""
    teacher = write_tiny_checkpoint(str(tmp_path / "other"), "qwen2", seed=2, tokenizer=train_tokenizer(OTHER_CORPUS))
    report = doctor(config(distill_setup, f"teacher.path={teacher}", "teacher.tokenizer=auto"),
                    ("vocab", "self_test", "engine", "teacher_loaded"))
    finding = only(report, "vocab")
    assert finding.status == OK and finding.details["tokenizer_mode"] == "cross"
    assert 0 < finding.details["shared_vocab_share"] < 1 and not finding.details["renumbered"]
    assert "teacher.tokenizer=auto: cross" in finding.message
    assert only(report, "self_test").status == OK and only(report, "engine").status == OK
    loaded = only(report, "teacher_loaded")
    assert loaded.status == WARN and "not measured: teacher has another tokenizer" in loaded.message


def with_chat_template(source: str, out: str, template: str) -> str:
    """A copy of `source` whose tokenizer_config.json holds `template` as its chat template."""
    shutil.copytree(source, out)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    if os.path.exists(os.path.join(out, "chat_template.jinja")):  # transformers 5 reads it first
        os.remove(os.path.join(out, "chat_template.jinja"))
    return out


def test_another_chat_template_fails(distill_setup, tmp_path):
    teacher = with_chat_template(distill_setup["teacher"], str(tmp_path / "templated"),
                                 "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### answer:\n")
    report = startup_checks(config(distill_setup, f"teacher.path={teacher}", "trainer.doctor=warn"),
                            print_report=False)
    finding = only(report, "vocab")
    assert finding.status == FAIL and report.exit_code == 2
    assert "chat templates differ" in finding.message and teacher in finding.message


def _teacher_at_temperature_one():
    from megatron_opd.teacher.megatron_teacher import MegatronTeacher

    built = MegatronTeacher.__init__

    def at_one(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.temperature = 1.0  # its log-probs enter at 1, the student's at rollout.temperature

    MegatronTeacher.__init__ = at_one


def test_temperature_on_one_side_only_fails_the_self_test(distill_setup):
    finding = only(doctor(config(distill_setup), ("self_test",), _teacher_at_temperature_one), "self_test")
    assert finding.status == FAIL
    assert "temperature applied on one side only" in finding.message
    assert "T=1 " in finding.message and "T=0.6" in finding.message


def test_teacher_holding_the_students_weights_fails(distill_setup, tmp_path):
    copy = shutil.copytree(distill_setup["student"], tmp_path / "copy")
    finding = only(doctor(config(distill_setup, f"teacher.path={copy}"), ("teacher_loaded",)), "teacher_loaded")
    assert finding.status == FAIL
    assert "teacher.path holds the student's weights" in finding.message and str(copy) in finding.message


def _engine_at_temperature_one():
    import dataclasses

    from megatron_opd.rollout.embedded_engine import EmbeddedEngine

    generate = EmbeddedEngine.generate

    def at_one(self, prompts, sampling):
        return generate(self, prompts, dataclasses.replace(sampling, temperature=1.0))

    EmbeddedEngine.generate = at_one


def test_engine_sampling_at_another_temperature_fails(distill_setup):
    finding = only(doctor(config(distill_setup), ("engine",), _engine_at_temperature_one), "engine")
    assert finding.status == FAIL
    assert "samples at another temperature than the trainer assumes" in finding.message
    assert finding.details["fitted_temperature"] == pytest.approx(1.0, rel=1e-2)


def test_a_warning_exits_1(distill_setup, tmp_path):
    """A top-2 teacher of a random tiny model holds far less than 0.9 of its mass: a warning, exit code 1."""
    code, out, _ = forked(tmp_path, main, ["--checks", "vocab,topk_clamps", *overrides(
        distill_setup, "actor.kl_loss_type=topk_reverse", "actor.topk=2")])
    assert code == 1, out
    assert "[warn] topk_clamps (teacher)" in out and "raise actor.topk" in out


def test_cli_json_and_exit_code(distill_setup, tmp_path):
    teacher = with_chat_template(distill_setup["teacher"], str(tmp_path / "templated"), "{{ messages }}")
    done = subprocess.run([sys.executable, "-m", "megatron_opd.doctor", "--json", "--cheap",
                           *overrides(distill_setup, f"teacher.path={teacher}")],
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    assert done.returncode == report["exit_code"] == 2, done.stderr
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert statuses == {"vocab": FAIL, "temperature": OK, "memory": OK}
    assert report["counts"] == {OK: 2, WARN: 0, FAIL: 1}


def test_memory_past_the_device_fails(distill_setup, monkeypatch):
    from megatron_opd.doctor.checks import memory

    monkeypatch.setattr(memory, "available", lambda device, world_size: (2 ** 20, "a 1 MiB device"))
    finding = only(run_doctor(config(distill_setup), ("memory",)), "memory")
    assert finding.status == FAIL and "Does not fit" in finding.message
    assert finding.details["need_bytes"] > 2 ** 20
