"""bf16 for real: with no dtype configured, bf16 checkpoints train in bf16 — the student with bf16 weights,
fp32 main parameters, gradients and Adam state (megatron's mixed precision), the teacher in bf16 — and the
divergence is computed in fp32 at every step, within 5% of the fp32 run's over its steps."""
import pytest
import torch

from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.config import to_config
from tests.conftest import distill_overrides, run_distributed
from tests.runs import composed


def _dtypes_and_curve(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer
    from megatron_opd.trainer.objective import Objective

    divergence_dtypes = set()
    per_token_kl = Objective.per_token_kl

    def recorded(self, *args, **kwargs):
        kl = per_token_kl(self, *args, **kwargs)
        divergence_dtypes.add(kl.dtype)
        return kl

    Objective.per_token_kl = recorded  # this forked worker's class only
    trainer = Trainer(cfg)
    run = trainer.run
    adam = run.optimizer.chained_optimizers[0].optimizer
    dtypes = {"student": {p.dtype for p in run.student[0].parameters()},
              "teacher": {p.dtype for p in run.teacher.chunks[0].parameters()},
              "main_params": {p.dtype for group in adam.param_groups for p in group["params"]},
              "main_grads": {p.main_grad.dtype for p in run.student[0].parameters()}}
    history = trainer.train()
    dtypes["adam_state"] = {t.dtype for state in adam.state.values() for k, t in state.items() if k != "step"}
    dtypes["divergence"] = divergence_dtypes
    return dtypes, [h["actor/kl_loss"] for h in history]


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("bf16")
    return {role: write_tiny_checkpoint(str(root / role), "qwen2", seed=seed, dtype=torch.bfloat16,
                                        tokenizer=tiny_tokenizer) for role, seed in (("student", 1), ("teacher", 2))}


def test_bf16_checkpoints_train_in_mixed_precision(distill_setup, bf16_pair, tmp_path):
    def run(save_dir, *extra):
        cfg = to_config(composed(*distill_overrides(distill_setup, save_dir), f"student.path={bf16_pair['student']}",
                                 f"teacher.path={bf16_pair['teacher']}", "trainer.total_steps=4",
                                 "actor.kl_loss_type=reverse", *extra))
        return run_distributed(_dtypes_and_curve, 1, cfg, timeout_s=300)[0]

    dtypes, bf16_curve = run(tmp_path / "bf16")
    assert dtypes == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}, "main_params": {torch.float32},
                      "main_grads": {torch.float32}, "adam_state": {torch.float32}, "divergence": {torch.float32}}
    fp32_dtypes, fp32_curve = run(tmp_path / "fp32", "student.dtype=float32", "teacher.dtype=float32")
    assert fp32_dtypes["student"] == {torch.float32}
    # The same weights (bf16 values) in fp32, the same rollouts' seeds: the KL differs by bf16 rounding of the
    # activations and of the weights after each update.
    print(f"bf16 {bf16_curve}, fp32 {fp32_curve}")
    assert len(bf16_curve) == 4 and bf16_curve == pytest.approx(fp32_curve, rel=5e-2)
