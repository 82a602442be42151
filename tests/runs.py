"""Training runs for the tests, in process: the config composed as opd-train composes it (Hydra over the
schema), the trainer on forked gloo workers (tests/conftest.py: run_distributed). The launchers themselves
(opd-train, torchrun, launch/local.sh, sbatch) are covered by tests/test_seed_example.py and tests/launch/.
What the tests read of a finished run: its metrics.jsonl and its checkpoint. And an entry point's main() in a
forked process, with its exit code and output, for the cases that need no interpreter of their own."""
import json
import multiprocessing
import os
import sys

import pytest
from hydra import compose, initialize_config_dir

from megatron_opd.config import to_config
from megatron_opd.train import CONFIG_DIR
from tests.conftest import distill_overrides, run_distributed

RUN_TIMEOUT_S = 600
# Layouts, the teacher's layouts and the policy-gradient form give the 1-process run's numbers to this: only the
# order of float32 reductions changes (measured gaps: ~1e-7).
REL = 1e-5


def composed(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="distillation_trainer", overrides=list(overrides))


def run_config(setup, save_dir, *extra):
    """The tiny run's validated config (tests/conftest.py: distill_overrides) with `extra` overrides."""
    return to_config(composed(*distill_overrides(setup, save_dir, *extra)))


def _train(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer

    history = Trainer(cfg).train()
    return history if rank == 0 else None


def train(setup, save_dir, *extra, world_size=1):
    """The run's history (rank 0's metrics per step) on `world_size` processes."""
    return run_distributed(_train, world_size, run_config(setup, save_dir, *extra), timeout_s=RUN_TIMEOUT_S)[0]


def kl_curve(history):
    return [h["actor/kl_loss"] for h in history]


def metrics(save_dir) -> dict:
    """step -> its metrics line; every step logged once."""
    lines = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return {line["step"]: line for line in lines}


def learning(save_dir) -> dict:
    """step -> every metric but the clock's."""
    return {step: {k: v for k, v in line.items() if not k.startswith(("timing_s/", "perf/"))}
            for step, line in metrics(save_dir).items()}


def curve(save_dir) -> dict:
    return {step: (line["actor/kl_loss"], line["actor/grad_norm"]) for step, line in metrics(save_dir).items()}


def assert_checkpoint(save_dir, step: int, processes: int) -> None:
    final = save_dir / f"step_{step:06d}"
    assert (save_dir / "latest").read_text() == final.name
    assert (final / "model" / "metadata.json").is_file() and (final / "layout.json").is_file()
    assert sorted(p.name for p in final.glob("extra_rank*.pt")) == sorted(f"extra_rank{r}.pt" for r in range(processes))


def assert_same_curve(actual: dict, expected: dict, rel: float = REL) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=rel), step


def _entry_point(fn, args, out_path, err_path):
    import torch

    torch.set_num_threads(1)  # a forked child whose parent ran OpenMP work stalls with more (parallel/local_group.py)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err
        code = fn(*args)
    sys.exit(code or 0)


def forked(tmp_path, fn, *args, timeout_s: float = 180) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of fn(*args) in a forked process: a main() as its console script runs it,
    without the interpreter's start and the imports (~8 s each)."""
    out, err = tmp_path / "forked.stdout", tmp_path / "forked.stderr"
    process = multiprocessing.get_context("fork").Process(target=_entry_point, args=(fn, args, out, err))
    process.start()
    process.join(timeout=timeout_s)
    if process.is_alive():
        process.kill()
        pytest.fail(f"{fn.__name__} did not end within {timeout_s:.0f} s")
    return process.exitcode, out.read_text(), err.read_text()
