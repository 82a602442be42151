"""The layouts users launch, through the CLI (`torchrun -m megatron_opd.train`): data parallel, context
parallel, TP x DP and CP x TP give the 1-process run's KL and grad norm step by step (rel 1e-3: only the
order of float32 reductions changes); each finishes with a complete checkpoint; stopped after 2 steps
(`trainer.exit_interval=2`) and run again, it continues exactly as the uninterrupted run; and a DP=2
checkpoint resumes on one process. ~5 min on 2 CPU cores (12 short runs)."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import distill_overrides

STEPS = 4
REL = 1e-3
RUN_TIMEOUT_S = 300


def launch(setup, save_dir, processes: int, *extra) -> None:
    module = [sys.executable, "-m", "megatron_opd.train"]
    if processes > 1:
        module = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                  "-m", "megatron_opd.train"]
    args = distill_overrides(setup, save_dir, f"trainer.total_steps={STEPS}", "trainer.export_hf=false", *extra)
    done = subprocess.run(module + args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def metrics(save_dir) -> dict:
    """step -> its metrics line; every step logged once."""
    lines = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return {line["step"]: line for line in lines}


def curve(save_dir) -> dict:
    return {step: (line["actor/kl_loss"], line["actor/grad_norm"]) for step, line in metrics(save_dir).items()}


def assert_checkpoint(save_dir, step: int, processes: int) -> None:
    final = save_dir / f"step_{step:06d}"
    assert (save_dir / "latest").read_text() == final.name
    assert (final / "model" / "metadata.json").is_file() and (final / "layout.json").is_file()
    assert sorted(p.name for p in final.glob("extra_rank*.pt")) == sorted(f"extra_rank{r}.pt" for r in range(processes))


def assert_same_curve(actual: dict, expected: dict, steps=range(1, STEPS + 1)) -> None:
    assert sorted(actual) == list(steps)
    for step in steps:
        assert actual[step] == pytest.approx(expected[step], rel=REL), step


@pytest.fixture(scope="module")
def one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("one_process")
    launch(distill_setup, save, 1)
    return curve(save)


def check_layout(setup, tmp_path, processes: int, layout: tuple, one_process: dict):
    """The uninterrupted run equals the 1-process run; stopped with a checkpoint after step 2 and run again,
    it continues bit for bit. Returns a copy of the run directory as it was at the stop."""
    straight = tmp_path / "straight"
    launch(setup, straight, processes, *layout)
    assert_checkpoint(straight, STEPS, processes)
    assert_same_curve(curve(straight), one_process)

    resumed = tmp_path / "resumed"
    launch(setup, resumed, processes, *layout, "trainer.exit_interval=2")
    assert sorted(curve(resumed)) == [1, 2]
    assert_checkpoint(resumed, 2, processes)
    at_stop = tmp_path / "at_stop"
    shutil.copytree(resumed, at_stop)
    launch(setup, resumed, processes, *layout)
    assert curve(resumed) == curve(straight)
    return at_stop


@pytest.mark.parametrize("processes, layout", [(2, ("parallel.context=2",)),
                                               (4, ("parallel.context=2", "parallel.tensor=2"))],
                         ids=["cp2", "cp2xtp2"])
def test_context_parallel_equals_one_process_and_resumes_exactly(one_process, distill_setup, tmp_path, processes,
                                                                  layout):
    check_layout(distill_setup, tmp_path, processes, layout, one_process)


def test_data_parallel_equals_one_process_resumes_exactly_and_on_one_process(one_process, distill_setup, tmp_path):
    at_stop = check_layout(distill_setup, tmp_path, 2, (), one_process)
    # The optimizer state reshards along DP; the extras of the DP=2 run's rank 0 serve the single rank.
    launch(distill_setup, at_stop, 1)
    assert_checkpoint(at_stop, STEPS, 1)
    assert_same_curve(curve(at_stop), one_process)


def test_tp2_dp2_equals_one_process(one_process, distill_setup, tmp_path):
    launch(distill_setup, tmp_path, 4, "parallel.tensor=2")
    assert_checkpoint(tmp_path, STEPS, 4)
    assert_same_curve(curve(tmp_path), one_process)
