"""An optimizer step whose gradients are not finite is refused, logged and counted — never applied, and
never shown as a grad norm of 0. The gradients come from a teacher with a NaN in its weights."""
import math

import torch
from safetensors.torch import load_file, save_file

from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.config import to_config
from tests.conftest import distill_overrides, run_distributed
from tests.runs import composed


def _train(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer

    return Trainer(cfg).train()


def test_non_finite_gradients_refuse_the_update_and_are_counted(distill_setup, tiny_tokenizer, tmp_path):
    teacher = write_tiny_checkpoint(str(tmp_path / "nan_teacher"), "qwen2", seed=2, tokenizer=tiny_tokenizer)
    weights = load_file(f"{teacher}/model.safetensors")
    weights["model.embed_tokens.weight"][7] = float("nan")  # tied: a NaN logit at every position
    save_file(weights, f"{teacher}/model.safetensors", metadata={"format": "pt"})

    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path / "run", f"teacher.path={teacher}",
                                                "trainer.total_steps=2", "actor.kl_loss_type=reverse",
                                                "actor.optim.lr_decay=linear")))
    history = run_distributed(_train, 1, cfg, timeout_s=300)[0]
    assert [h["actor/skipped_updates"] for h in history] == [1.0, 1.0]
    assert [h["trainer/skipped_updates_total"] for h in history] == [1.0, 2.0]
    assert all(math.isnan(h["actor/grad_norm"]) for h in history)
    assert history[-1]["actor/lr"] == 1e-3  # a linear decay that never advanced: no update was counted as one
    exported = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    original = load_file(f"{distill_setup['student']}/model.safetensors")
    assert all(torch.equal(exported[name], original[name]) for name in original)


def _with_a_bad_step(rank, world_size, cfg, bad_step: int, poison: bool):
    """The run with step `bad_step` (0-based) poisoned on rank 1 only (its loss times NaN: a NaN gradient there,
    and after DP's reduction everywhere) when `poison`, or with that step's update left out altogether (its
    rollouts still drawn); then this rank's optimizer and schedule state and its metrics."""
    from megatron_opd.trainer import loop
    from megatron_opd.trainer.objective import Objective

    current = {"step": None}
    call, step, update = Objective.__call__, loop.Trainer._step, loop.Trainer.update

    def poisoned_call(self, inputs):
        loss, metrics = call(self, inputs)
        return (loss * float("nan") if current["step"] == bad_step and rank == 1 else loss), metrics

    def tracked_step(self, index):
        current["step"] = index
        return step(self, index)

    def update_unless_bad(self, samples, batch):
        if current["step"] == bad_step:
            return {"actor/skipped_updates": 0.0, "actor/grad_norm": 0.0}, 0.0
        return update(self, samples, batch)

    # this forked worker's classes only
    loop.Trainer._step = tracked_step
    if poison:
        Objective.__call__ = poisoned_call
    else:
        loop.Trainer.update = update_unless_bad
    trainer = loop.Trainer(cfg)
    run = trainer.run
    history = trainer.train()
    adam = run.optimizer.chained_optimizers[0].optimizer
    state = {"adam": [{k: v.clone() for k, v in adam.state[p].items()} for g in adam.param_groups for p in g["params"]],
             "main_params": [p.detach().clone() for g in adam.param_groups for p in g["params"]],
             "schedule": (run.scheduler.num_steps, adam.param_groups[0]["lr"]), "skipped": run.skipped_updates}
    return state, history


def test_a_step_non_finite_on_one_rank_is_skipped_everywhere_as_if_it_never_happened(distill_setup, tmp_path):
    """DP=2, a linear lr decay, step 2 of 4 NaN on rank 1 only: both ranks refuse it, and the run then goes on
    exactly as a run whose step 2 made no update — Adam's moments and step count, the main weights, the lr
    schedule and every later step's KL and grad norm, bit for bit."""
    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path / "run", "trainer.total_steps=4",
                                                "actor.kl_loss_type=reverse", "actor.optim.lr_decay=linear",
                                                "trainer.export_hf=false")))
    poisoned = run_distributed(_with_a_bad_step, 2, cfg, 1, True, timeout_s=300)
    cfg.trainer.save_dir = str(tmp_path / "without")
    without = run_distributed(_with_a_bad_step, 2, cfg, 1, False, timeout_s=300)
    history = poisoned[0][1]
    assert [h["actor/skipped_updates"] for h in history] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(history[1]["actor/grad_norm"])
    for (state, _), (reference, _) in zip(poisoned, without):
        assert state["skipped"] == 1 and reference["skipped"] == 0  # every rank refused the step
        assert state["schedule"] == reference["schedule"] and state["schedule"][0] == 3  # 3 updates counted
        for name in ("adam", "main_params"):
            assert len(state[name]) == len(reference[name]) > 0
        for got, want in zip(state["adam"], reference["adam"]):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert all(torch.equal(got, want) for got, want in zip(state["main_params"], reference["main_params"]))
    later = lambda h: [(line["actor/kl_loss"], line["actor/grad_norm"], line["actor/lr"]) for line in h[2:]]  # noqa: E731
    assert later(history) == later(without[0][1])
