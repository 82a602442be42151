"""distillation_loss: verl's aggregation modes, the coefficients and metrics, and exactness across
micro-batches and ranks: DP=2 x CP=2 with 2 micro-batches, and TP=2 x CP=2 end to end from sharded logits,
give the loss and gradients of one rank holding everything."""
import pytest
import torch
import torch.distributed as dist

from megatron_opd.loss import (
    AGG_MODES, distillation_loss, response_counts, vocab_parallel_divergence, vocab_parallel_entropy)
from tests.conftest import run_distributed
from tests.loss import reference
from tests.loss.reference import assert_rel_close, make_logits, vocab_slice

BATCH, SEQ = 8, 12
COEFS = dict(kl_loss_coef=0.7, entropy_coeff=0.05)


def _batch(seed=0):
    """Per-token KL and entropy [BATCH, SEQ], and a ragged response mask with one empty sequence."""
    gen = torch.Generator().manual_seed(seed)
    kl = torch.rand(BATCH, SEQ, generator=gen, dtype=torch.float64)
    entropy = torch.rand(BATCH, SEQ, generator=gen, dtype=torch.float64) * 3
    starts = torch.randint(0, 6, (BATCH, 1), generator=gen)
    ends = torch.randint(6, SEQ + 1, (BATCH, 1), generator=gen)
    positions = torch.arange(SEQ)
    mask = (positions >= starts) & (positions < ends)
    mask[3] = False
    return kl, entropy, mask


def _verl_agg(values, mask, mode):
    mask = mask.double()
    if mode == "token-mean":
        return (values * mask).sum() / mask.sum()
    has_tokens = mask.sum(-1) > 0
    seq_sums = (values * mask).sum(-1)[has_tokens]
    if mode == "seq-mean-token-sum":
        return seq_sums.mean()
    return (seq_sums / mask.sum(-1)[has_tokens]).mean()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_single_batch_matches_verl(mode):
    kl, entropy, mask = _batch()
    loss, metrics = distillation_loss(kl, mask, entropy=entropy, loss_agg_mode=mode, **COEFS)
    kl_agg, entropy_agg = _verl_agg(kl, mask, mode), _verl_agg(entropy, mask, mode)
    torch.testing.assert_close(metrics["actor/kl_loss"], kl_agg, rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics["actor/entropy_loss"], entropy_agg, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss, 0.7 * kl_agg - 0.05 * entropy_agg, rtol=1e-14, atol=0)


def test_positions_outside_the_response_may_hold_nan():
    kl, _, mask = _batch()
    kl = kl.masked_fill(~mask, float("nan")).requires_grad_(True)
    for mode in AGG_MODES:
        loss, _ = distillation_loss(kl, mask, loss_agg_mode=mode)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(kl.grad).all()
        assert not kl.grad[~mask].any()


def test_without_entropy():
    kl, _, mask = _batch()
    loss, metrics = distillation_loss(kl, mask, kl_loss_coef=2.0)
    assert set(metrics) == {"actor/kl_loss"}
    torch.testing.assert_close(loss, 2.0 * _verl_agg(kl, mask, "token-mean"))
    with pytest.raises(ValueError, match="entropy_coeff=0.1 needs the per-token entropy"):
        distillation_loss(kl, mask, entropy_coeff=0.1)


def test_rejects_unknown_mode_and_shape_mismatch():
    kl, _, mask = _batch()
    with pytest.raises(ValueError, match="loss_agg_mode='seq-sum'"):
        distillation_loss(kl, mask, loss_agg_mode="seq-sum")
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(kl, mask[:, :5])


def _cp_positions(cp_rank, cp_size, seq_len):
    """Megatron's load-balanced context-parallel split: 2 * CP chunks, rank r holds r and 2CP - 1 - r."""
    chunks = torch.arange(seq_len).chunk(2 * cp_size)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])


def _two_by_two_groups(rank):
    """Groups {0,1},{2,3} (ranks sharing rank // 2) and {0,2},{1,3} (sharing rank % 2); every rank
    creates all of them, in the same order."""
    first = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    second = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return first[rank // 2], second[rank % 2]


def _dp_cp_worker(rank, world_size):
    cp_group, dp_group = _two_by_two_groups(rank)  # rank = dp * 2 + cp
    dp_rank, cp_rank = rank // 2, rank % 2
    kl, entropy, mask = _batch()
    positions = _cp_positions(cp_rank, 2, SEQ)
    seqs = torch.arange(dp_rank * BATCH // 2, (dp_rank + 1) * BATCH // 2)
    micro_batches = seqs.chunk(2)
    masks = [mask[mb][:, positions] for mb in micro_batches]
    counts = response_counts(masks, dp_group=dp_group, cp_group=cp_group)
    results = {}
    for mode in AGG_MODES:
        total, grads = 0.0, []
        for i, mb in enumerate(micro_batches):
            local_kl = kl[mb][:, positions].clone().requires_grad_(True)
            local_entropy = entropy[mb][:, positions].clone().requires_grad_(True)
            loss, _ = distillation_loss(local_kl, masks[i], entropy=local_entropy, loss_agg_mode=mode,
                                        global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs,
                                        seq_num_tokens=counts.seq_num_tokens[i], **COEFS)
            loss.backward()
            total += loss.item()
            grads.append((mb, local_kl.grad, local_entropy.grad))
        results[mode] = (total, positions, grads)
    return results, counts.num_tokens.item(), counts.num_seqs.item()


def test_dp_cp_micro_batches_give_the_global_loss_and_gradients():
    ranks = run_distributed(_dp_cp_worker, 4)
    kl, entropy, mask = _batch()
    for _, num_tokens, num_seqs in ranks:
        assert (num_tokens, num_seqs) == (mask.sum().item(), (mask.sum(-1) > 0).sum().item())
    for mode in AGG_MODES:
        full_kl, full_entropy = kl.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
        expected, _ = distillation_loss(full_kl, mask, entropy=full_entropy, loss_agg_mode=mode, **COEFS)
        expected.backward()
        total = sum(results[mode][0] for results, _, _ in ranks)
        assert abs(total - expected.item()) <= 1e-12 * abs(expected.item()), f"{mode}: {total} != {expected.item()}"
        grad_kl, grad_entropy = torch.zeros_like(kl), torch.zeros_like(entropy)
        for results, _, _ in ranks:
            _, positions, grads = results[mode]
            for seqs, local_grad_kl, local_grad_entropy in grads:
                grad_kl[seqs[:, None], positions] = local_grad_kl
                grad_entropy[seqs[:, None], positions] = local_grad_entropy
        torch.testing.assert_close(grad_kl, full_kl.grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_entropy, full_entropy.grad, rtol=1e-12, atol=0)


LOGIT_BATCH, LOGIT_SEQ, VOCAB, PADDED = 2, 8, 29, 32


def _logit_batch():
    student, teacher, _ = make_logits(31, (LOGIT_BATCH, LOGIT_SEQ), VOCAB, PADDED)
    mask = torch.ones(LOGIT_BATCH, LOGIT_SEQ, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 6:] = False
    return student, teacher, mask


def _tp_cp_worker(rank, world_size):
    tp_group, cp_group = _two_by_two_groups(rank)  # rank = cp * 2 + tp
    tp_rank, cp_rank = rank % 2, rank // 2
    student, teacher, mask = _logit_batch()
    positions = _cp_positions(cp_rank, 2, LOGIT_SEQ)
    local_student = vocab_slice(student[:, positions], tp_rank, 2).clone().requires_grad_(True)
    local_teacher = vocab_slice(teacher[:, positions], tp_rank, 2)
    local_mask = mask[:, positions]
    kl = vocab_parallel_divergence(local_student, local_teacher, "reverse", temperature=0.9, group=tp_group,
                                   vocab_size=VOCAB)
    entropy = vocab_parallel_entropy(local_student, temperature=0.9, group=tp_group, vocab_size=VOCAB)
    counts = response_counts(local_mask, cp_group=cp_group)
    loss, _ = distillation_loss(kl, local_mask, entropy=entropy, loss_agg_mode="seq-mean-token-mean",
                                global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs,
                                seq_num_tokens=counts.seq_num_tokens[0], **COEFS)
    loss.backward()
    return loss.item(), positions, local_student.grad


def test_tp_cp_sharded_logits_give_the_global_loss_and_gradients():
    ranks = run_distributed(_tp_cp_worker, 4)
    student, teacher, mask = _logit_batch()

    def global_loss(s):
        kl = reference.divergence(s, teacher.double(), "reverse", temperature=0.9, vocab_size=VOCAB)
        log_p = reference.log_softmax(s, VOCAB, 0.9)
        entropy = -(log_p.exp() * log_p).sum(-1)
        mode = "seq-mean-token-mean"
        return 0.7 * _verl_agg(kl, mask, mode) - 0.05 * _verl_agg(entropy, mask, mode)
    expected, expected_grad = reference.value_and_grad(global_loss, student, torch.tensor(1.0))
    for tp_rank in (0, 1):
        total = sum(ranks[cp * 2 + tp_rank][0] for cp in (0, 1))  # the CP shares sum to the global loss
        assert abs(total - expected.item()) <= 1e-6 * abs(expected.item()), f"TP rank {tp_rank}: {total}"
    grad = torch.zeros_like(expected_grad)
    for rank, (_, positions, local_grad) in enumerate(ranks):
        tp_rank = rank % 2
        grad[:, positions, tp_rank * PADDED // 2:(tp_rank + 1) * PADDED // 2] = local_grad.double()
    assert_rel_close(grad, expected_grad, 1e-6, "TP x CP gradient")
