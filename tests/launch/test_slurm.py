"""`sbatch launch/distill.sh` on a real one-node SLURM cluster (the `slurm_cluster` fixture), two trainer
processes (TP=2): a run to the end, preemption by SIGUSR1 (the script requeues the job) and by `scontrol
requeue` (SLURM's SIGTERM) in one job, and a bad override. ~3 min on 2 CPU cores."""
import re
import subprocess
import time

from tests.launch.helpers import REPO, metric_steps, tail, tiny_overrides, wait_until
from tests.launch.slurm_jobs import DISTILL_SCRIPT, FINAL_STATES, job_env, job_info, job_log, submit, wait_job

PROCS_PER_NODE = 2
# ~0.45 s a step at TP=2 on 2 cores: the second stop request comes 2 steps after the first restart (step ~3),
# so it lands ~5 s before the end
PREEMPT_STEPS = 16


def test_sbatch_wait_runs_two_processes_to_the_end(slurm_cluster, distill_setup, tmp_path):
    """As a user types it, from the repo root; the command line's --output wins over the script's."""
    save = tmp_path / "save"
    started = time.monotonic()
    done = subprocess.run([slurm_cluster.program("sbatch"), "--wait", "--gpus-per-node=0",
                           f"--output={tmp_path}/%x-%j.log", "launch/distill.sh",
                           *tiny_overrides(distill_setup, save_dir=save)],
                          cwd=REPO, env=job_env(slurm_cluster, PROCS_PER_NODE, from_repo=True), capture_output=True,
                          text=True, timeout=400)
    logs = list(tmp_path.glob("opd-distill-*.log"))
    log_text = tail(logs[0]) if logs else "(no job log)"
    assert done.returncode == 0, f"sbatch --wait: exit {done.returncode}\n{done.stdout}{done.stderr}\n{log_text}"
    assert "(1 x 2 processes)" in log_text, log_text
    assert (save / "latest").read_text() == "step_000004"
    assert (save / "step_000004" / "model" / "metadata.json").is_file()
    assert (save / "step_000004" / "extra_rank1.pt").is_file()  # written by the second process
    assert metric_steps(save / "metrics.jsonl") == [1, 2, 3, 4]
    print(f"sbatch --wait tiny run: {time.monotonic() - started:.1f} s")


def test_preempted_twice_resumes_and_finishes_every_step_once(slurm_cluster, distill_setup, tmp_path):
    """Submitted from tmp_path (default log and run directory). First the signal --signal=B:USR1@300 sends
    near the time limit (the script requeues the job), then `scontrol requeue` (SLURM ends the job itself:
    SIGTERM, SIGKILL after KillWait=30 s, and requeues it). Each time a checkpoint after the step in flight,
    a restart that resumes from it, and at the end every step's metrics line exactly once."""
    cluster = slurm_cluster
    job = submit(cluster, tmp_path, tiny_overrides(distill_setup, f"trainer.total_steps={PREEMPT_STEPS}"),
                 procs_per_node=PROCS_PER_NODE)
    run_dir = tmp_path / "runs" / f"opd-distill-{job}"
    log = job_log(tmp_path, job)
    metrics = run_dir / "metrics.jsonl"
    scancel, scontrol = cluster.program("scancel"), cluster.program("scontrol")

    def running_with_steps(count):
        def check():
            assert job_info(cluster, job)["JobState"] not in FINAL_STATES, f"job ended early\n{tail(log)}"
            return len(metric_steps(metrics)) >= count
        return check

    details = lambda: tail(log) + "\n" + cluster.logs()  # noqa: E731
    wait_until(running_with_steps(2), 240, "the first two steps", details)
    subprocess.run([scancel, "--signal=USR1", "--batch", job], env=cluster.env(), check=True, timeout=30)
    wait_until(lambda: "restart 1)" in log.read_text(), 120, "the first restart", details)
    first_stop = int(re.search(r'trainer stopped after \{"step": (\d+)', log.read_text()).group(1))
    wait_until(running_with_steps(first_stop + 2), 240, "two steps after the first resume", details)
    subprocess.run([scontrol, "requeue", job], env=cluster.env(), check=True, timeout=30)
    info = wait_job(cluster, job, log)

    text = log.read_text(errors="replace")
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "2", "0:0"), \
        f"{info}\n{tail(log)}"
    assert metric_steps(metrics) == list(range(1, PREEMPT_STEPS + 1)), f"{metric_steps(metrics)}\n{tail(log)}"
    stops = [int(step) for step in re.findall(r'trainer stopped after \{"step": (\d+)', text)]
    assert len(stops) == 2 and 2 <= stops[0] < stops[1] < PREEMPT_STEPS, (stops, tail(log))
    assert re.findall(r"opd: job \d+ start \(restart (\d+)\)", text) == ["0", "1", "2"], tail(log)
    for stop in stops:
        assert f"opd: resuming from {run_dir}/step_{stop:06d}" in text, tail(log)
    assert "opd: SIGUSR1" in text and "requeueing job" in text, tail(log)
    assert "opd: SIGTERM" in text and "SLURM is ending the job" in text, tail(log)
    checkpoints = sorted(p.name for p in run_dir.glob("step_*"))
    assert checkpoints == [f"step_{step:06d}" for step in (*stops, PREEMPT_STEPS)], checkpoints
    assert not list(run_dir.glob("preempt.flag*")), "the flag files are cleared"


def run_seconds(run_time: str) -> int:
    """SLURM's [D-]HH:MM:SS (or MM:SS)."""
    days, _, clock = run_time.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + 86400 * int(days or 0)


def test_bad_override_fails_fast_with_the_config_error(slurm_cluster, distill_setup, tmp_path):
    """Followed with scontrol, not `sbatch --wait`, which polls ever more slowly (2, 10, 42 s ...)."""
    job = submit(slurm_cluster, tmp_path, [*tiny_overrides(distill_setup), "trainer.bogus=1"],
                 procs_per_node=PROCS_PER_NODE)
    log = job_log(tmp_path, job)
    info = wait_job(slurm_cluster, job, log, timeout_s=120)
    assert info["JobState"] == "FAILED", f"{info}\n{tail(log)}"
    assert "Key 'bogus' not in 'TrainerConfig'" in log.read_text(), tail(log)
    assert run_seconds(info["RunTime"]) < 60, f"a config error took {info['RunTime']} to fail the job"


def test_script_refuses_to_run_outside_slurm(tmp_path):
    done = subprocess.run(["bash", str(DISTILL_SCRIPT), "trainer.total_steps=1"], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "submit it with sbatch" in done.stderr
