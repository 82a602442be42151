"""The demo's stages run the project's CLIs as subprocesses, sharing the machine's cores."""
import os
import subprocess
import sys
import threading
import time

_threads = threading.local()


def share_cores(lanes: int) -> None:
    """The CLIs this thread starts get an equal share of the cores among `lanes` running at once."""
    _threads.count = max(1, (os.cpu_count() or 1) // lanes)


def cli(module: str, *overrides: str) -> str:
    started = time.perf_counter()
    env = dict(os.environ)
    if hasattr(_threads, "count"):  # set by share_cores
        env["OMP_NUM_THREADS"] = str(_threads.count)
    done = subprocess.run([sys.executable, "-m", module, *overrides], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{module} failed:\n{done.stderr[-4000:]}")
    print(f"    {module.split('.')[-1]} done in {time.perf_counter() - started:.0f}s", flush=True)
    return done.stdout
