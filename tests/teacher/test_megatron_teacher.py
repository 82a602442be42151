"""A teacher in its own layout on the trainer's ranks equals the co-located one: with the student at TP=1,
DP=2 on 2 processes, a teacher at TP=2 or at PP=2 gives the same loss and gradients for one update (1e-5)
and the same 4-step curve (rel 1e-5), for the full-vocabulary kind (hidden states routed to the student) and
a top-k kind (per-token values routed). The pair is the tiny Qwen2.5-0.5B/7B look-alike:
padded vocabularies that differ, a tied student and an untied teacher, 14/2 against 28/4 heads."""
import math

import pytest
import torch

from megatron_opd.config import to_config
from tests.conftest import distill_overrides, run_distributed
from tests.runs import REL, composed, train

LAYOUTS = {"co-located": (), "teacher_tp2": ("teacher.parallel.tensor=2",),
           "teacher_pp2": ("teacher.parallel.pipeline=2",)}
KINDS = (("actor.kl_loss_type=reverse",), ("actor.kl_loss_type=topk_reverse", "actor.topk=8"))


def _one_update(rank, world_size, cfg):
    """The loss and the gradient of one update: this rank's shard of the DP-reduced gradient, as the
    distributed optimizer sees it (the optimizer step replaced by a capture)."""
    from megatron_opd.trainer import loop
    from megatron_opd.trainer.optim import StepOutcome
    from megatron_opd.trainer.rollouts import step_samples

    trainer = loop.Trainer(cfg)
    grads = {}

    def capture(optimizer, clip_grad):
        optimizer.prepare_grads()
        grads.update({i: p.grad.detach().clone() for i, p in enumerate(optimizer.get_parameters())})
        return StepOutcome(applied=False, grad_norm=math.nan)

    loop.optimizer_step = capture  # this forked worker's module only
    run = trainer.run
    samples = step_samples(run, cfg, 0, run.next_items())
    metrics, _ = trainer.update(samples.pairs, samples.batch(run.pad_id, run.dims.device, 1))
    run.close()
    return metrics["actor/kl_loss"], grads


@pytest.mark.parametrize("kind", KINDS, ids=["reverse", "topk_reverse"])
def test_one_update_equals_the_co_located_teachers(qwen_pair, tmp_path, kind):
    results = {}
    for name, layout in LAYOUTS.items():
        cfg = to_config(composed(*distill_overrides(qwen_pair, tmp_path / name, "trainer.export_hf=false", *kind,
                                                    *layout)))
        results[name] = run_distributed(_one_update, 2, cfg, timeout_s=600)
    for name in ("teacher_tp2", "teacher_pp2"):
        for rank, ((loss, grads), (rank_loss, rank_grads)) in enumerate(zip(results["co-located"], results[name])):
            assert rank_loss == pytest.approx(loss, rel=1e-5), name
            assert len(grads) == len(rank_grads) > 0
            for shard, grad in grads.items():
                err = (rank_grads[shard] - grad).abs().max().item()
                assert err <= 1e-5 * max(grad.abs().max().item(), 1e-12), (name, rank, shard, err)


def test_curve_equals_the_co_located_teachers(qwen_pair, tmp_path):
    curves = {name: train(qwen_pair, tmp_path / name, "trainer.export_hf=false", "actor.kl_loss_type=reverse",
                          *layout, world_size=2) for name, layout in LAYOUTS.items()}
    kl = {name: [line["actor/kl_loss"] for line in curve] for name, curve in curves.items()}
    assert len(kl["co-located"]) == 4
    for name in ("teacher_tp2", "teacher_pp2"):
        assert kl[name] == pytest.approx(kl["co-located"], rel=REL), name
        # A 2-way teacher DP=1 holds every sequence; half of them go to the other student DP rank.
        hidden_bytes = 224 * torch.finfo(torch.float32).bits // 8
        assert curves[name][0]["teacher/bytes_moved_per_token"] == pytest.approx(hidden_bytes / 2), name
    assert curves["co-located"][0]["teacher/bytes_moved_per_token"] == 0.0
