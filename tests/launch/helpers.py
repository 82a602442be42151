"""Shared by the launch tests: the tiny run's overrides for two processes, the python the jobs should use,
metrics reading, waiting with a deadline."""
import json
import sys
import time
from pathlib import Path

from tests.conftest import distill_overrides

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(setup, *extra, save_dir=None, tensor_parallel=True) -> list[str]:
    """The tiny distillation run for two processes: TP=2, or with tensor_parallel=False no parallel.* key at
    all (the trainer makes them DP=2); no trainer.save_dir unless given."""
    args = [a for a in distill_overrides(setup, "unused") if not a.startswith("trainer.save_dir=")]
    if save_dir is not None:
        args.append(f"trainer.save_dir={save_dir}")
    if tensor_parallel:
        args.append("parallel.tensor=2")
    return [*args, *extra]


def python_env() -> dict:
    """OPD_PYTHON only when the tests do not run on the repo's own .venv (which the scripts find)."""
    if Path(sys.executable) == REPO / ".venv" / "bin" / "python":
        return {}
    return {"OPD_PYTHON": sys.executable}


def metric_values(metrics: Path, key: str) -> list:
    """`key` of every line of a metrics.jsonl, in order (none while the file does not exist)."""
    if not metrics.exists():
        return []
    return [json.loads(line)[key] for line in metrics.read_text().splitlines() if line.strip()]


def metric_steps(metrics: Path) -> list[int]:
    return metric_values(metrics, "step")


def wait_until(condition, timeout_s: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.2)


def tail(path: Path, lines: int = 150) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
