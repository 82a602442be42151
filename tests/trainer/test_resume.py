"""`kill -9` mid-run, then the same command again: the resumed run continues exactly (same losses as an
uninterrupted run), and no checkpoint is ever half-written."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import distill_overrides
from tests.runs import train

STEPS = 8


def command(setup, save_dir):
    return [sys.executable, "-m", "megatron_opd.train",
            *distill_overrides(setup, save_dir, f"trainer.total_steps={STEPS}", "trainer.save_freq=2")]


# One thread, as the in-process workers (tests/runs.py) compute: other thread counts sum in other orders.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def last_metrics_per_step(save_dir):
    by_step = {}
    for line in open(os.path.join(save_dir, "metrics.jsonl")):
        record = json.loads(line)
        by_step[record["step"]] = record  # a step repeated after a resume: the later run's line
    return by_step


def test_kill_and_resume_continues_exactly(distill_setup, tmp_path):
    straight = tmp_path / "straight"  # the uninterrupted run, in process (tests/runs.py)
    train(distill_setup, straight, f"trainer.total_steps={STEPS}", "trainer.save_freq=2")
    reference = last_metrics_per_step(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(distill_setup, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ONE_THREAD, start_new_session=True)
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

    subprocess.run(command(distill_setup, killed), check=True, capture_output=True, timeout=300, env=ONE_THREAD)
    resumed = last_metrics_per_step(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert resumed[step]["actor/kl_loss"] == reference[step]["actor/kl_loss"], step
        assert resumed[step]["actor/grad_norm"] == reference[step]["actor/grad_norm"], step


def test_a_metrics_line_lost_after_its_checkpoint_comes_back_from_it(distill_setup, tmp_path):
    """A kill between a step's checkpoint and its metrics line (here: the line removed by hand after a stop at
    step 2) loses nothing: the resumed run restores the line from the checkpoint and logs each step once."""
    base = ("trainer.total_steps=3", "trainer.export_hf=false")
    train(distill_setup, tmp_path, *base, "trainer.exit_interval=2")
    metrics = tmp_path / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    metrics.write_text(first + "\n")
    train(distill_setup, tmp_path, *base)
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[1]) == json.loads(second)


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def test_a_trainer_killed_alone_leaves_no_helper_process(distill_setup, tmp_path):
    """SIGKILL to the trainer process only (the OOM killer's way): the checkpoint writer's helper process it
    forked goes with it instead of sleeping on, holding memory, for good."""
    import psutil

    process = subprocess.Popen(command(distill_setup, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "latest").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        helpers = _children(process.pid)
        assert helpers, "the trainer forked no helper (the checkpoint writer's queue manager)"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in helpers):
            assert time.monotonic() < deadline, f"helper processes {helpers} outlived their trainer"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_fresh_run_keeps_no_metrics_line_of_an_earlier_one(tmp_path):
    """trainer.resume=never into a save_dir that holds an earlier (say, killed) run's metrics.jsonl."""
    from megatron_opd.trainer.metrics import JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 5.0}\n{"step": 2, "a": 6.0}\n')
    sink = JsonlSink(str(path), start_step=0)
    sink.log(1, {"a": 1.0})
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "a": 1.0}]
