"""The same weights give the same numbers in every layout: TP=2 logits == TP=1, PP=2 (and VPP)
forward-backward == PP=1 in loss and gradients, TP=2xPP=2 on 4 processes. Weights travel between
layouts through a torch_dist checkpoint saved at TP=2 (whose vocab padding differs from TP=1's)."""
import pytest
import torch

from megatron_opd.models.forward import full_logits
from megatron_opd.models.sharded_checkpoint import save_model
from megatron_opd.parallel import ParallelConfig
from tests.conftest import FAMILIES, run_distributed
from tests.mcore_helpers import build_in_layout, loss_and_grads, sample_tokens

_saved = {}


def _only(results):
    values = [r for r in results if r is not None]
    assert len(values) == 1, f"expected one rank to return a result, got {len(values)}"
    return values[0]


def _save_worker(rank, ws, model_dir, ckpt_dir, parallel=ParallelConfig(tensor=2)):
    arch, chunks = build_in_layout(model_dir, parallel, seed=7)
    logits = full_logits(chunks, sample_tokens(arch.vocab_size), vocab_size=arch.vocab_size)
    save_model(chunks, ckpt_dir)
    return logits if rank == 0 else None


def _logits_worker(rank, ws, model_dir, parallel, ckpt_dir):
    from megatron.core import parallel_state

    arch, chunks = build_in_layout(model_dir, parallel, ckpt_dir, seed=99)
    logits = full_logits(chunks, sample_tokens(arch.vocab_size), micro_batch_size=2, vocab_size=arch.vocab_size)
    return logits if parallel_state.get_tensor_model_parallel_rank() == 0 else None


def _loss_grads_worker(rank, ws, model_dir, parallel, ckpt_dir):
    from megatron.core import parallel_state

    arch, chunks = build_in_layout(model_dir, parallel, ckpt_dir, seed=99)
    loss, grads = loss_and_grads(chunks, sample_tokens(arch.vocab_size, seed=1), arch.vocab_size)
    keep = parallel_state.get_tensor_model_parallel_rank() == 0
    return (loss, grads) if keep else None


def saved_tp2(family, tiny_models, tmp_path_factory):
    """A torch_dist checkpoint written at TP=2 and the TP=2 logits of its weights (one per family)."""
    if family not in _saved:
        ckpt = str(tmp_path_factory.mktemp(f"tp2_{family}") / "ckpt")
        logits = _only(run_distributed(_save_worker, 2, tiny_models[family], ckpt))
        _saved[family] = (ckpt, logits)
    return _saved[family]


def _merged_grads(results):
    loss, grads = None, {}
    for result in results:
        if result is None:
            continue
        loss = result[0] if result[0] is not None else loss
        grads.update(result[1])
    return loss, grads


def _assert_same_loss_and_grads(reference, other):
    (ref_loss, ref_grads), (loss, grads) = reference, other
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(ref_grads) <= set(grads), f"missing grads: {set(ref_grads) - set(grads)}"
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert sum(g.abs().sum() for g in ref_grads.values()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_logits_equal_tp1(family, tiny_models, tmp_path_factory):
    ckpt, tp2_logits = saved_tp2(family, tiny_models, tmp_path_factory)
    tp1_logits = _only(run_distributed(_logits_worker, 1, tiny_models[family], ParallelConfig(), ckpt))
    assert tp1_logits.shape == tp2_logits.shape
    torch.testing.assert_close(tp1_logits, tp2_logits, rtol=1e-5, atol=1e-5)


def test_tp1_checkpoint_loads_at_tp2_with_more_vocab_padding(tiny_models, tmp_path):
    ckpt = str(tmp_path / "tp1")
    tp1_logits = _only(run_distributed(_save_worker, 1, tiny_models["mistral"], ckpt, ParallelConfig()))
    tp2_logits = _only(run_distributed(_logits_worker, 2, tiny_models["mistral"], ParallelConfig(tensor=2), ckpt))
    torch.testing.assert_close(tp2_logits, tp1_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pp2_loss_and_grads_equal_pp1(family, tiny_models, tmp_path_factory):
    ckpt, _ = saved_tp2(family, tiny_models, tmp_path_factory)
    pp1 = _merged_grads(run_distributed(_loss_grads_worker, 1, tiny_models[family], ParallelConfig(), ckpt))
    pp2 = _merged_grads(run_distributed(_loss_grads_worker, 2, tiny_models[family],
                                        ParallelConfig(pipeline=2), ckpt))
    _assert_same_loss_and_grads(pp1, pp2)


def test_vpp2_loss_and_grads_equal_pp1(tiny_models, tmp_path_factory):
    ckpt, _ = saved_tp2("qwen2", tiny_models, tmp_path_factory)
    model_dir = tiny_models["qwen2"]
    pp1 = _merged_grads(run_distributed(_loss_grads_worker, 1, model_dir, ParallelConfig(), ckpt))
    vpp = _merged_grads(run_distributed(_loss_grads_worker, 2, model_dir,
                                        ParallelConfig(pipeline=2, virtual_pipeline=2), ckpt))
    _assert_same_loss_and_grads(pp1, vpp)


def test_tp2_pp2_on_four_processes(tiny_models, tmp_path_factory):
    ckpt, tp2_logits = saved_tp2("qwen3", tiny_models, tmp_path_factory)
    layout = ParallelConfig(tensor=2, pipeline=2)
    logits = _only(run_distributed(_logits_worker, 4, tiny_models["qwen3"], layout, ckpt))
    torch.testing.assert_close(logits, tp2_logits, rtol=1e-5, atol=1e-5)
    loss, _ = _merged_grads(run_distributed(_loss_grads_worker, 4, tiny_models["qwen3"], layout, ckpt))
    ref_loss, _ = _merged_grads(run_distributed(_loss_grads_worker, 1, tiny_models["qwen3"], ParallelConfig(), ckpt))
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def _recompute_worker(rank, ws, model_dir, ckpt_dir, recompute):
    from megatron_opd.models import build_model, load_arch
    from megatron_opd.models.sharded_checkpoint import load_model
    from megatron_opd.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig())
    arch = load_arch(model_dir)
    chunks = build_model(arch, ParallelConfig(), recompute=recompute)
    load_model(chunks, ckpt_dir)
    for chunk in chunks:
        chunk.train()
    return loss_and_grads(chunks, sample_tokens(arch.vocab_size, seed=1), arch.vocab_size)


def test_activation_recompute_gives_the_same_loss_and_grads(tiny_models, tmp_path_factory):
    ckpt, _ = saved_tp2("llama", tiny_models, tmp_path_factory)
    plain = run_distributed(_recompute_worker, 1, tiny_models["llama"], ckpt, "none")[0]
    for mode in ("selective", "full"):
        _assert_same_loss_and_grads(plain, run_distributed(_recompute_worker, 1, tiny_models["llama"], ckpt, mode)[0])


def test_bf16_logits_stay_close_to_fp32(tiny_models, tmp_path_factory):
    ckpt, fp32_logits = saved_tp2("qwen2", tiny_models, tmp_path_factory)

    bf16_logits = _only(run_distributed(_bf16_logits_worker, 2, tiny_models["qwen2"], ckpt))
    assert bf16_logits.dtype == torch.float32  # gathered logits are upcast for comparison
    # bf16 keeps 8 bits of mantissa: logits of size ~1 agree to a few hundredths.
    torch.testing.assert_close(bf16_logits, fp32_logits, rtol=0, atol=5e-2)
    assert not torch.equal(bf16_logits, fp32_logits)


def _bf16_logits_worker(rank, ws, model_dir, ckpt_dir):
    arch, chunks = build_in_layout(model_dir, ParallelConfig(tensor=2), ckpt_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in chunks[0].parameters())
    logits = full_logits(chunks, sample_tokens(arch.vocab_size), vocab_size=arch.vocab_size)
    return logits if rank == 0 else None
