"""A small job graph for the demo: each job names the jobs it needs and the file it leaves when done; the
ready ones run LANES at a time (threads that mostly wait on the CLIs' subprocesses, a share of the cores
each). A job whose file exists is skipped (the demo resumes where it stopped) unless `force`; each finished
job's wall time is kept in seconds.json beside the outputs, so the report can charge every arm its time.
Progress (progress.py) reports as they run."""
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from megatron_opd.demo.cli_runner import share_cores
from megatron_opd.demo.progress import Progress

# Held by a job thread while it uses torch's global generator or transformers' loading in this process
# (initial weights, loading a model, sampling): neither is thread-safe. Two jobs writing initial weights at
# once made them depend on the interleaving; two loads at once left a tied output layer uninitialised.
TORCH_IN_PROCESS = threading.Lock()


@dataclass
class Job:
    name: str
    run: Callable[[], None]
    done_file: str
    needs: tuple = field(default_factory=tuple)
    steps: int = 0  # a training job's optimizer steps, when known before it runs: its share of the estimate


def run_jobs(jobs: list[Job], lanes: int, seconds_path: str, force: bool = False, progress: Progress = None) -> dict:
    """Runs every job once the jobs it needs are done; returns {job name: wall seconds} of all jobs so far.
    `progress`: how to report (a Progress on stdout when None)."""
    known = {job.name for job in jobs}
    for job in jobs:
        missing = [need for need in job.needs if need not in known]
        if missing:
            raise ValueError(f"job {job.name} needs {missing}, which no job makes")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    pending = []
    for job in jobs:
        if os.path.exists(job.done_file) and not force:
            print(f"[{job.name}] done before, skipped", flush=True)
        else:
            pending.append(job)
    names = {job.name for job in pending}
    progress = progress or Progress()

    def run(job: Job, share: int) -> None:
        share_cores(share)
        with progress.running(job):
            started = time.perf_counter()
            job.run()
            seconds[job.name] = time.perf_counter() - started

    running = {}
    # the pool closes first: after a job raised, the others still running are reported until they end
    with progress.watching(jobs, pending, lanes, dict(seconds)), ThreadPoolExecutor(lanes) as pool:
        while pending or running:
            ready = [j for j in pending if not any(n in names for n in j.needs)]
            if not ready and not running:
                raise RuntimeError(f"jobs wait on each other in a circle: {[j.name for j in pending]}")
            for job in ready[:lanes - len(running)]:
                pending.remove(job)
                running[pool.submit(run, job, lanes if len(ready) > 1 or running else 1)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                future.result()
                progress.finished(job.name, seconds[job.name])
                names.discard(job.name)
                os.makedirs(os.path.dirname(seconds_path), exist_ok=True)
                with open(seconds_path, "w") as f:
                    json.dump(seconds, f, indent=1, sort_keys=True)
    return seconds
