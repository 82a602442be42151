"""The layouts users launch: data parallel, context parallel, TP x DP and CP x TP give the 1-process run's KL
and grad norm step by step (rel 1e-5: only the order of float32 reductions changes); each finishes with a
complete checkpoint; stopped after 2 steps (`trainer.exit_interval=2`) and run again, a run continues exactly
as the uninterrupted one, bit for bit; and a DP=2 checkpoint resumes on one process. In-process runs on forked gloo workers (tests/runs.py); the
launchers are covered by tests/test_seed_example.py and tests/launch/. ~1 min on 2 CPU cores."""
import shutil

import pytest

from tests.runs import assert_checkpoint, assert_same_curve, curve, train

STEPS = 4


def run_steps(setup, save_dir, processes: int, *extra) -> None:
    """The tiny run for STEPS steps on `processes` processes, without the final HF export."""
    train(setup, save_dir, f"trainer.total_steps={STEPS}", "trainer.export_hf=false", *extra, world_size=processes)


@pytest.fixture(scope="module")
def one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("one_process")
    run_steps(distill_setup, save, 1)
    return curve(save)


def check_layout(setup, tmp_path, processes: int, layout: tuple, one_process: dict):
    """The uninterrupted run equals the 1-process run; stopped with a checkpoint after step 2 and run again, it
    continues bit for bit. Returns a copy of the run directory as it was at the stop."""
    straight = tmp_path / "straight"
    run_steps(setup, straight, processes, *layout)
    assert_checkpoint(straight, STEPS, processes)
    assert_same_curve(curve(straight), one_process)
    resumed = tmp_path / "resumed"
    run_steps(setup, resumed, processes, *layout, "trainer.exit_interval=2")
    assert sorted(curve(resumed)) == [1, 2]
    assert_checkpoint(resumed, 2, processes)
    at_stop = tmp_path / "at_stop"
    shutil.copytree(resumed, at_stop)
    run_steps(setup, resumed, processes, *layout)
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
    run_steps(distill_setup, at_stop, 1)
    assert_checkpoint(at_stop, STEPS, 1)
    assert_same_curve(curve(at_stop), one_process)


def test_tp2_dp2_equals_one_process(one_process, distill_setup, tmp_path):
    run_steps(distill_setup, tmp_path, 4, "parallel.tensor=2")
    assert_checkpoint(tmp_path, STEPS, 4)
    assert_same_curve(curve(tmp_path), one_process)
