"""The demo's stages run the project's CLIs as subprocesses, sharing the machine's cores."""
import os
import subprocess
import sys
import threading

from megatron_opd.demo.progress import track_training

_threads = threading.local()


def share_cores(lanes: int) -> None:
    """The CLIs this thread starts get an equal share of the cores among `lanes` running at once."""
    _threads.count = max(1, (os.cpu_count() or 1) // lanes)


def cli(module: str, *overrides: str) -> str:
    env = dict(os.environ)
    if hasattr(_threads, "count"):  # set by share_cores
        env["OMP_NUM_THREADS"] = str(_threads.count)
    given = dict(o.split("=", 1) for o in overrides if "=" in o)  # the last of a key wins, as in hydra
    if "trainer.save_dir" in given and "trainer.total_steps" in given:  # a training run: its steps are shown
        track_training(given["trainer.save_dir"], int(given["trainer.total_steps"]))
    done = subprocess.run([sys.executable, "-m", module, *overrides], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{module} failed:\n{done.stderr[-4000:]}")
    return done.stdout
