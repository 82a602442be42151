"""`kill -9` mid-run, then the same command again: the resumed run continues exactly (same losses as an
uninterrupted run), and no checkpoint is ever half-written."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import distill_overrides

STEPS = 8


def command(setup, save_dir):
    return [sys.executable, "-m", "megatron_opd.train",
            *distill_overrides(setup, save_dir, f"trainer.total_steps={STEPS}", "trainer.save_freq=2")]


def last_metrics_per_step(save_dir):
    by_step = {}
    for line in open(os.path.join(save_dir, "metrics.jsonl")):
        record = json.loads(line)
        by_step[record["step"]] = record  # a step repeated after a resume: the later run's line
    return by_step


def test_kill_and_resume_continues_exactly(distill_setup, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(command(distill_setup, straight), check=True, capture_output=True, timeout=300)
    reference = last_metrics_per_step(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(distill_setup, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    latest = killed / "latest"
    deadline = time.monotonic() + 240
    while not (latest.exists() and latest.read_text() == "step_000002"):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = max(last_metrics_per_step(killed))
    assert interrupted_at < STEPS, "the run finished before it was killed"
    kept = killed / latest.read_text()
    assert (kept / "model" / "metadata.json").is_file() and (kept / "extra_rank0.pt").is_file()

    subprocess.run(command(distill_setup, killed), check=True, capture_output=True, timeout=300)
    resumed = last_metrics_per_step(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert resumed[step]["actor/kl_loss"] == reference[step]["actor/kl_loss"], step
        assert resumed[step]["actor/grad_norm"] == reference[step]["actor/grad_norm"], step
