"""`bash launch/local.sh`: the same job without SLURM, two processes through torchrun. SIGUSR1 to the
script stops it after a checkpoint; the same command again resumes and finishes every step once."""
import os
import signal
import subprocess

from tests.launch.helpers import REPO, metric_steps, python_env, tail, tiny_overrides, wait_until

STEPS = 6


def test_local_two_processes_stop_on_usr1_and_resume(distill_setup, tmp_path):
    save = tmp_path / "run"
    command = ["bash", str(REPO / "launch" / "local.sh"),
               *tiny_overrides(distill_setup, f"trainer.total_steps={STEPS}", save_dir=save)]
    env = {**os.environ, "OPD_PROCS_PER_NODE": "2", **python_env()}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            def two_steps():
                assert process.poll() is None, f"local.sh ended early\n{tail(first_log)}"
                return len(metric_steps(save / "metrics.jsonl")) >= 2

            wait_until(two_steps, 240, "the first two steps", lambda: tail(first_log))
            os.kill(process.pid, signal.SIGUSR1)
            assert process.wait(timeout=120) == 0, tail(first_log)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    stopped_at = metric_steps(save / "metrics.jsonl")
    assert stopped_at == list(range(1, len(stopped_at) + 1)) and len(stopped_at) < STEPS, stopped_at
    assert (save / "latest").read_text() == f"step_{len(stopped_at):06d}", tail(first_log)
    assert "run the same command again to resume" in first_log.read_text()

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert metric_steps(save / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert (save / "latest").read_text() == f"step_{STEPS:06d}"
    assert (save / "hf" / "config.json").is_file()
    assert not list(save.glob("preempt.flag*"))
