"""opd-train's start-up: bad input (data, checkpoint, device) ends the run with one line naming the problem
and exit code 2, no traceback, before any step."""
import os
import subprocess
import sys

import pytest

from megatron_opd.data.schema import make_row, write_rows
from tests.conftest import distill_overrides


def start(setup, save_dir, *extra):
    # No GPU visible, whatever the machine: trainer.device=cuda must fail here, and auto must mean the CPU.
    return subprocess.run([sys.executable, "-m", "megatron_opd.train", *distill_overrides(setup, save_dir, *extra)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def long_prompt_file(path):
    rows = [make_row(data_source="test", question=f"What is {i} + 1?" + " fox" * (200 if i == 3 else 0),
                     instruction="Answer.", ground_truth=str(i + 1), split="train", index=i, answer="#") for i in range(6)]
    write_rows(path, rows)
    return str(path)


@pytest.mark.parametrize("override, says", [
    ("data.train_files=/nonexistent/train.parquet", "/nonexistent/train.parquet"),
    ("trainer.resume=/nonexistent/step_000001", "trainer.resume=/nonexistent/step_000001: not a complete trainer "
                                                "checkpoint"),
    ("trainer.device=cuda", "trainer.device=cuda: "),
    ("overlong", "row 3: key 'prompt': prompt has more tokens than data.max_prompt_length=128"),
], ids=["missing-data", "not-a-checkpoint", "no-gpu", "overlong-prompt"])
def test_bad_input_stops_start_up_with_one_line(distill_setup, tmp_path, override, says):
    if override == "overlong":
        override = f"data.train_files={long_prompt_file(tmp_path / 'long.parquet')}"
    done = start(distill_setup, tmp_path / "run", override)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
