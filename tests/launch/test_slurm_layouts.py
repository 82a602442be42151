"""The layouts users submit `launch/distill.sh` with, each a tiny run to its end: `--ntasks-per-node=2` on
the one-node cluster (two trainer processes, DP=2), and `--nodes=2` with one process per node on the
simulated two-node cluster (`slurm_two_node_cluster`) at DP=2 and at TP=2, so the cross-node c10d
rendezvous runs for real. ~2 min on 2 CPU cores."""
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.launch.helpers import metric_steps, metric_values, tail, tiny_overrides
from tests.launch.slurm_jobs import job_log, submit, wait_job
from tests.runs import REL

STEPS = 4  # the tiny run's trainer.total_steps
RUN_TIMEOUT_S = 240  # a tiny run takes ~25-50 s here, most of it start-up


class FinishedRun(NamedTuple):
    info: dict
    log: Path
    save: Path


def run_to_end(cluster, cwd: Path, setup, *options: str, tensor_parallel: bool) -> FinishedRun:
    """No OPD_PROCS_PER_NODE: the processes per node come from the sbatch options."""
    save = cwd / "save"
    job = submit(cluster, cwd, tiny_overrides(setup, save_dir=save, tensor_parallel=tensor_parallel), *options)
    log = job_log(cwd, job)
    return FinishedRun(wait_job(cluster, job, log, RUN_TIMEOUT_S), log, save)


def assert_finished(run: FinishedRun, nodes: int, procs_per_node: int) -> None:
    """Completed on whole nodes with the layout asked for, every step's metrics once, and the last step's
    checkpoint complete, each rank's part included."""
    details = tail(run.log)
    assert (run.info["JobState"], run.info["ExitCode"]) == ("COMPLETED", "0:0"), f"{run.info}\n{details}"
    assert (run.info["NumNodes"], run.info["OverSubscribe"]) == (str(nodes), "NO"), run.info
    assert f"({nodes} x {procs_per_node} processes)" in run.log.read_text(), details
    assert metric_steps(run.save / "metrics.jsonl") == list(range(1, STEPS + 1)), details
    checkpoint = f"step_{STEPS:06d}"
    assert (run.save / "latest").read_text() == checkpoint, details
    assert (run.save / checkpoint / "model" / "metadata.json").is_file(), details
    for rank in range(nodes * procs_per_node):
        assert (run.save / checkpoint / f"extra_rank{rank}.pt").is_file(), f"rank {rank}\n{details}"


@pytest.fixture(scope="module")
def one_node_data_parallel(slurm_cluster, distill_setup, tmp_path_factory) -> FinishedRun:
    """One run, two uses: its own test, and the reference of the two-node DP=2 run."""
    return run_to_end(slurm_cluster, tmp_path_factory.mktemp("one_node_dp"), distill_setup,
                      "--ntasks-per-node=2", tensor_parallel=False)


def test_ntasks_per_node_starts_that_many_trainer_processes(one_node_data_parallel):
    assert_finished(one_node_data_parallel, nodes=1, procs_per_node=2)


def test_two_nodes_data_parallel_equals_one_node(slurm_two_node_cluster, distill_setup, one_node_data_parallel,
                                                 tmp_path):
    """Same data, seed and ranks as the one-node run: the same KL at every step, up to the order of the
    gradient reduction's floating-point sums."""
    run = run_to_end(slurm_two_node_cluster, tmp_path, distill_setup, "--nodes=2", tensor_parallel=False)
    assert_finished(run, nodes=2, procs_per_node=1)
    two_nodes = metric_values(run.save / "metrics.jsonl", "actor/kl_loss")
    one_node = metric_values(one_node_data_parallel.save / "metrics.jsonl", "actor/kl_loss")
    assert two_nodes == pytest.approx(one_node, rel=REL), (two_nodes, one_node)


def test_two_nodes_tensor_parallel(slurm_two_node_cluster, distill_setup, tmp_path):
    run = run_to_end(slurm_two_node_cluster, tmp_path, distill_setup, "--nodes=2", tensor_parallel=True)
    assert_finished(run, nodes=2, procs_per_node=1)


def test_ntasks_that_do_not_divide_over_the_nodes_are_refused(slurm_two_node_cluster, distill_setup, tmp_path):
    job = submit(slurm_two_node_cluster, tmp_path, tiny_overrides(distill_setup), "--nodes=2", "--ntasks=3")
    log = job_log(tmp_path, job)
    info = wait_job(slurm_two_node_cluster, job, log, timeout_s=60)
    assert info["JobState"] == "FAILED", f"{info}\n{tail(log)}"
    assert "--ntasks=3 does not divide over 2 nodes" in log.read_text(), tail(log)
    assert "--ntasks-per-node=N" in log.read_text(), tail(log)
