"""opd-train's start-up: a bad config value, data file, checkpoint or device ends the run with one line naming
the problem (`error: ...`) and exit code 2, no traceback, before any step. The bad value and the missing GPU go
through the CLI as a user runs it; the other cases run the same entry point (`megatron_opd.train.main`) in a
forked process, which spares the interpreter's start and the imports (~8 s each)."""
import os
import subprocess
import sys

import pytest

from megatron_opd.data.schema import make_row, write_rows
from tests.conftest import distill_overrides
from tests.runs import forked


def cli(setup, save_dir, *extra):
    # No GPU visible, whatever the machine: trainer.device=cuda must fail here, and auto must mean the CPU.
    done = subprocess.run([sys.executable, "-m", "megatron_opd.train", *distill_overrides(setup, save_dir, *extra)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return done.returncode, done.stderr


def _main(argv):
    from megatron_opd.train import main

    sys.argv = ["opd-train", *argv]
    main()


def forked_main(setup, save_dir, *extra):
    code, _, stderr = forked(save_dir.parent, _main, distill_overrides(setup, save_dir, *extra))
    return code, stderr


def long_prompt_file(path):
    rows = [make_row(data_source="test", question=f"What is {i} + 1?" + " fox" * (200 if i == 3 else 0),
                     instruction="Answer.", ground_truth=str(i + 1), split="train", index=i, answer="#") for i in range(6)]
    write_rows(path, rows)
    return str(path)


def other_chat_template(setup, tmp_path) -> str:
    from tests.doctor.test_doctor import with_chat_template

    return "teacher.path=" + with_chat_template(setup["teacher"], str(tmp_path / "templated"), "{{ messages }}")


@pytest.mark.parametrize("start, override, says", [
    (cli, "actor.kl_loss_type=foo", "actor.kl_loss_type='foo': must be one of kl|abs|mse|low_var_kl"),
    (cli, "trainer.device=cuda", "trainer.device=cuda: "),
    (forked_main, "data.train_files=/nonexistent/train.parquet", "/nonexistent/train.parquet"),
    (forked_main, "trainer.resume=/nonexistent/step_000001", "trainer.resume=/nonexistent/step_000001: not a "
                                                            "complete trainer checkpoint"),
    (forked_main, "overlong", "row 3: key 'prompt': prompt has more tokens than data.max_prompt_length=128"),
    (forked_main, "doctor", "trainer.doctor=strict: a start-up check failed"),
], ids=["bad-value", "no-gpu", "missing-data", "not-a-checkpoint", "overlong-prompt", "doctor-strict"])
def test_bad_input_stops_start_up_with_one_line(distill_setup, tmp_path, start, override, says):
    extra = ()
    if override == "overlong":
        override = f"data.train_files={long_prompt_file(tmp_path / 'long.parquet')}"
    if override == "doctor":  # a teacher whose chat template differs from the student's
        override, extra = other_chat_template(distill_setup, tmp_path), ("trainer.doctor=strict",)
    code, stderr = start(distill_setup, tmp_path / "run", override, *extra)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and says in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
