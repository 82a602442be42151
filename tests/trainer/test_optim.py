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
