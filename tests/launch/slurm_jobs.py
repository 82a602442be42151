"""Submitting launch/distill.sh to a local SLURM cluster (tests/launch/local_slurm.py) and following the
job: its environment, sbatch, scontrol's view of it, waiting for its end with a deadline."""
import re
import subprocess
from pathlib import Path
from typing import Optional

from tests.launch.helpers import REPO, python_env, tail, wait_until

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_FIELDS = ("JobState", "Restarts", "ExitCode", "RunTime", "NumNodes", "OverSubscribe")
DISTILL_SCRIPT = REPO / "launch" / "distill.sh"


def job_env(cluster, procs_per_node: Optional[int] = None, from_repo: bool = False) -> dict:
    """procs_per_node: OPD_PROCS_PER_NODE (None: the script decides from the sbatch options). Submitted from
    the repo root, the script finds the repo (and its .venv) by itself."""
    procs = {} if procs_per_node is None else {"OPD_PROCS_PER_NODE": str(procs_per_node)}
    return cluster.env(**procs, **({} if from_repo else {"OPD_REPO": str(REPO)}), **python_env())


def submit(cluster, cwd: Path, args: list[str], *options: str, procs_per_node: Optional[int] = None) -> str:
    """sbatch from `cwd` (the submit directory: default log and run directory go there); the job id."""
    done = subprocess.run([cluster.program("sbatch"), "--parsable", "--gpus-per-node=0", *options,
                           str(DISTILL_SCRIPT), *args],
                          cwd=cwd, env=job_env(cluster, procs_per_node), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sbatch failed: {done.stdout}{done.stderr}"
    return done.stdout.strip().split(";")[0]


def job_log(cwd: Path, job_id: str) -> Path:
    """The script's default log in the submit directory."""
    return cwd / f"opd-distill-{job_id}.log"


def job_info(cluster, job_id: str) -> dict:
    out = subprocess.run([cluster.program("scontrol"), "show", "job", "-o", job_id], env=cluster.env(),
                         capture_output=True, text=True, timeout=30).stdout
    found = {key: re.search(rf"\b{key}=(\S+)", out) for key in JOB_FIELDS}
    return {key: match.group(1) if match else None for key, match in found.items()}


def wait_job(cluster, job_id: str, log: Path, timeout_s: float = 300) -> dict:
    """scontrol's view of the finished job. Past the deadline the job is cancelled (the next test gets the
    nodes) and the wait fails with the job's log and the daemons' logs."""
    info = {}

    def finished():
        info.update(job_info(cluster, job_id))
        return info["JobState"] in FINAL_STATES

    try:
        wait_until(finished, timeout_s, f"job {job_id} to finish (last seen {info})",
                   lambda: tail(log) + "\n" + cluster.logs())
    except AssertionError:
        subprocess.run([cluster.program("scancel"), job_id], env=cluster.env(), timeout=30)
        raise
    return info
