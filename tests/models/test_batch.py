"""Token batches: token-budget micro-batches hold every sequence once, stay within the budget, pad less than
fixed-size ones and keep each sequence's tokens; and a training run with `actor.max_tokens_per_micro_batch`
gives the fixed-size path's losses and grad norms (rel 1e-5), at PP=1 and at PP=2 (micro-batches of varying
shapes crossing the stages)."""
import random

import pytest
import torch

from megatron_opd.models.batch import build_batch, response_loss_mask
from megatron_opd.config import to_config
from tests.conftest import distill_overrides, run_distributed
from tests.runs import composed

CPU = torch.device("cpu")


def mixed_batch(rows=16, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 200) for _ in range(rng.randint(4, 30))] for _ in range(rows)]
    responses = [[rng.randrange(5, 200) for _ in range(rng.randint(1, 60))] for _ in range(rows)]
    return build_batch(prompts, responses, pad_id=3, device=CPU, multiple=4), prompts, responses


def padding_fraction(micro_batches):
    padded = sum(mb.tokens.numel() for mb in micro_batches)
    return 1 - sum(int(mb.lengths.sum()) for mb in micro_batches) / padded


def test_token_budget_micro_batches_hold_every_sequence_once_within_the_budget():
    batch, prompts, responses = mixed_batch()
    micro = batch.token_budget_micro_batches(max_tokens=160, multiple=4)
    assert sorted(int(i) for mb in micro for i in mb.index) == list(range(batch.size))
    for mb in micro:
        assert mb.tokens.numel() <= 160 and mb.tokens.shape[1] % 4 == 0
        assert mb.tokens.shape[1] == -(-int(mb.lengths.max()) // 4) * 4  # padded to its own longest only
        for row, i in enumerate(mb.index.tolist()):
            sequence = prompts[i] + responses[i]
            assert mb.tokens[row, :len(sequence)].tolist() == sequence
            assert mb.loss_mask[row].sum() == len(responses[i])
    assert padding_fraction(micro) < padding_fraction(batch.micro_batches(2)) / 2


def test_a_budget_below_the_longest_sequence_is_refused():
    batch, _, _ = mixed_batch()
    with pytest.raises(ValueError, match=r"actor.max_tokens_per_micro_batch=20 is below a sequence of this step"):
        batch.token_budget_micro_batches(max_tokens=20, multiple=4)


def _curve(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer

    history = Trainer(cfg).train()
    return [(h["actor/kl_loss"], h["actor/grad_norm"]) for h in history] if rank == 0 else None


@pytest.mark.parametrize("layout, world", [((), 1), (("parallel.pipeline=2",), 2)], ids=["pp1", "pp2"])
def test_token_budget_training_equals_fixed_micro_batches(distill_setup, tmp_path, layout, world):
    def run(name, *extra):
        cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path / name), "trainer.total_steps=3",
                                 "actor.kl_loss_type=reverse", "trainer.export_hf=false", *layout, *extra))
        return run_distributed(_curve, world, cfg, timeout_s=600)[0]

    fixed = run("fixed")
    budget = run("budget", "actor.max_tokens_per_micro_batch=100")
    for step, ((kl, norm), (budget_kl, budget_norm)) in enumerate(zip(fixed, budget), 1):
        assert budget_kl == pytest.approx(kl, rel=1e-5) and budget_norm == pytest.approx(norm, rel=1e-5), step


def test_response_masks_drop_the_tokens_overlapping_a_skipped_span():
    # tokens "ab" "c" " d" "e" over "abc de"; skipping "c" and the "d" of " d"
    assert response_loss_mask([(0, 2), (2, 3), (3, 5), (5, 6)], [(2, 3), (4, 5)]) == [1.0, 0.0, 0.0, 1.0]
    batch = build_batch([[5, 6]], [[7, 8, 9]], pad_id=3, device=CPU, response_masks=[[1.0, 0.0, 1.0]])
    assert batch.loss_mask.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]


def test_engine_log_probs_and_reward_advantages_follow_their_rows():
    batch = build_batch([[5, 6], [5]], [[7, 8], [9, 10, 11]], pad_id=3, device=CPU, multiple=4,
                        engine_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]], reward_advantages=[0.5, -0.5])
    # position t holds the log-prob of labels[t], the response tokens predicted from len(prompt) - 1 on
    assert torch.allclose(batch.engine_logprobs, torch.tensor([[0, -0.1, -0.2, 0], [-0.3, -0.4, -0.5, 0]]))
    swapped = batch.select(torch.tensor([1, 0]), 3)
    assert torch.allclose(swapped.engine_logprobs, torch.tensor([[-0.3, -0.4, -0.5], [0, -0.1, -0.2]]))
    assert swapped.reward_advantages.tolist() == [-0.5, 0.5]
    shard = batch.context_shard(1, 2)  # CP rank 1 of 2 holds chunks 1 and 2 of 4
    assert torch.allclose(shard.engine_logprobs, torch.tensor([[-0.1, -0.2], [-0.4, -0.5]]))
    assert shard.reward_advantages.tolist() == [0.5, -0.5]
