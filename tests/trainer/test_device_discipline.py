"""No project code path relies on the default device: every tensor factory called from the project's own
code (megatron_opd/, checkpoint_tools/) names its device. Checked on real runs — distillation steps with
validation, a checkpoint and a resume, at TP=1, CP=2 and PP=2 (in the policy-gradient form) — under a
TorchFunctionMode that records each factory call by its caller's file and line. On a GPU node a factory
without a device puts its tensor on the CPU beside CUDA tensors; on this CPU machine only such a check can
see it."""
import collections
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_opd.parallel import cpu_compat
from megatron_opd.config import to_config
from tests.conftest import distill_overrides, run_distributed
from tests.runs import composed

FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.empty_strided, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
             torch.randint, torch.randperm}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = tuple(os.path.join(REPO, package) + os.sep for package in ("megatron_opd", "checkpoint_tools"))


class FactoriesNeedADevice(TorchFunctionMode):
    """Records project call sites of tensor factories: `placed` (device given) and `unplaced` (not)."""

    def __init__(self):
        super().__init__()
        self.placed, self.unplaced = collections.Counter(), collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            caller = sys._getframe(1)
            while caller.f_code.co_filename == cpu_compat.__file__:  # forwards megatron's own calls
                caller = caller.f_back
            if caller.f_code.co_filename.startswith(PROJECT):
                where = f"{os.path.relpath(caller.f_code.co_filename, REPO)}:{caller.f_lineno}"
                (self.placed if "device" in kwargs else self.unplaced)[where] += 1
        return func(*args, **kwargs)


def _train_watched(rank, world_size, runs):
    from megatron_opd.trainer.loop import Trainer

    mode = FactoriesNeedADevice()
    with mode:
        for cfg in runs:
            Trainer(cfg).train()
    return dict(mode.placed), dict(mode.unplaced)


def _runs(setup, save_dir, *extra):
    """Two steps with a checkpoint, then the same command resumed for a third; validation at steps 0 and 2."""
    base = (*distill_overrides(setup, save_dir), "trainer.test_freq=2", "trainer.save_freq=2", *extra)
    return [to_config(composed(*base, "trainer.total_steps=3", "trainer.exit_interval=2")),
            to_config(composed(*base, "trainer.total_steps=3"))]


def check(results):
    placed, unplaced = collections.Counter(), collections.Counter()
    for rank_placed, rank_unplaced in results:
        placed.update(rank_placed)
        unplaced.update(rank_unplaced)
    assert not unplaced, f"tensor factories without a device in project code: {sorted(unplaced)}"
    return placed


def test_every_factory_in_a_distillation_run_names_its_device(distill_setup, tmp_path):
    placed = check(run_distributed(_train_watched, 1, _runs(distill_setup, tmp_path, "actor.kl_loss_type=topk_reverse",
                                                             "actor.topk=4", "actor.entropy_coeff=0.01"),
                                   timeout_s=600))
    # The check saw the places that make the step's tensors (it cannot pass by watching nothing).
    for site in ("megatron_opd/models/batch.py", "megatron_opd/teacher/outputs.py",
                 "megatron_opd/rollout/embedded_engine.py", "megatron_opd/parallel/dims.py",
                 "megatron_opd/trainer/preemption.py", "checkpoint_tools/hf_files.py"):
        assert any(where.startswith(site) for where in placed), (site, sorted(placed))


# PP=2 runs the policy-gradient form with a reward and two updates a step: pi_old's own pass crosses stages.
PG_AT_PP2 = ("parallel.pipeline=2", "actor.policy_loss=pg", "reward.fn=gsm8k", "actor.ppo_epochs=2")


@pytest.mark.parametrize("layout, sites", [
    (("parallel.context=2",), ("megatron_opd/parallel/context_parallel.py",)),
    (PG_AT_PP2, ("megatron_opd/trainer/weight_push.py", "megatron_opd/trainer/rollouts.py",
                 "megatron_opd/loss/policy_gradient.py"))], ids=["cp2", "pp2_pg"])
def test_every_factory_in_a_two_process_run_names_its_device(distill_setup, tmp_path, layout, sites):
    placed = check(run_distributed(_train_watched, 2, _runs(distill_setup, tmp_path, *layout), timeout_s=600))
    for site in sites:
        assert any(where.startswith(site) for where in placed), (site, sorted(placed))
