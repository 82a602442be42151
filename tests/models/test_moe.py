"""Mixture-of-experts models (Qwen3-MoE, Mixtral, Qwen2-MoE, DeepSeek-V3) read from their HF config and loaded from their
HF weights give transformers' logits in every layout: one process, expert parallelism (EP=2, with either
token dispatcher), TP=2 (experts split over expert-TP 2, or whole at expert-TP 1 with EP=2) and PP=2."""
import pytest
import torch

from checkpoint_tools.pretrained import load_pretrained
from checkpoint_tools.verify import compare, hf_logits, sample_tokens
from megatron_opd.models import arch_from_dict, load_arch
from megatron_opd.models.builder import transformer_config
from megatron_opd.models.forward import full_logits
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.conftest import MOE_FAMILIES, run_distributed

TWO_PROCESS_LAYOUTS = {
    "ep2": ParallelConfig(expert=2),
    "ep2-alltoall": ParallelConfig(expert=2, token_dispatcher="alltoall"),
    "tp2": ParallelConfig(tensor=2),
    "tp2-ep2-etp1": ParallelConfig(tensor=2, expert=2, expert_tensor=1),  # whole experts over the TP ranks
    "pp2": ParallelConfig(pipeline=2),
}


def test_moe_facts_from_config(tiny_moe_models):
    qwen3, mixtral, qwen2 = (load_arch(tiny_moe_models[f]).moe for f in ("qwen3_moe", "mixtral", "qwen2_moe"))
    assert (qwen3.num_experts, qwen3.top_k, qwen3.ffn_hidden_size, qwen3.norm_topk_prob) == (4, 2, 32, True)
    assert qwen3.moe_layers == (False, True, True, True) and qwen3.shared_expert_size is None
    assert mixtral.norm_topk_prob and mixtral.moe_layers == (True,) * 4 and mixtral.ffn_hidden_size == 128
    assert (qwen2.shared_expert_size, qwen2.shared_expert_gated, qwen2.norm_topk_prob) == (64, True, False)
    assert load_arch(tiny_moe_models["qwen2_moe"]).qkv_bias and load_arch(tiny_moe_models["qwen3_moe"]).qk_norm


def test_routing_and_layers_reach_megatron(tiny_moe_models):
    import json
    import os

    cfg = json.load(open(os.path.join(tiny_moe_models["qwen3_moe"], "config.json")))
    # transformers 5 writes num_local_experts; Qwen3-30B-A3B's config.json says num_experts.
    cfg.update(num_experts=cfg.pop("num_local_experts"), decoder_sparse_step=2, mlp_only_layers=[],
               norm_topk_prob=False)
    arch = arch_from_dict(cfg)
    assert arch.moe.num_experts == 4 and arch.moe.moe_layers == (False, True, False, True)
    config = transformer_config(arch, ParallelConfig(expert=2))
    assert config.moe_layer_freq == [0, 1, 0, 1] and config.moe_router_pre_softmax  # softmax, top-k, no renorm
    assert (config.num_moe_experts, config.moe_router_topk, config.expert_model_parallel_size) == (4, 2, 2)
    assert config.moe_expert_capacity_factor is None and config.moe_aux_loss_coeff == 0.0
    assert not transformer_config(load_arch(tiny_moe_models["mixtral"]), ParallelConfig()).moe_router_pre_softmax


def _logits_in_layouts(rank, world_size, hf_dir, layouts, tokens):
    """Every layout in turn on the same forked processes: {layout: [logits of each rank that has them]}."""
    out = {}
    for name, parallel in layouts.items():
        dims = initialize_model_parallel(parallel)
        arch, chunks = load_pretrained(hf_dir, parallel, dtype="float32")
        logits = full_logits(chunks, tokens, vocab_size=arch.vocab_size)
        if logits is not None and dims.tp_rank == 0:
            out[name] = logits
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_equal_transformers_in_every_layout(family, tiny_moe_models):
    hf_dir = tiny_moe_models[family]
    arch = load_arch(hf_dir)
    tokens = sample_tokens(arch.vocab_size)
    reference = hf_logits(hf_dir, tokens)
    results = run_distributed(_logits_in_layouts, 1, hf_dir, {"one process": ParallelConfig()}, tokens)
    results += run_distributed(_logits_in_layouts, 2, hf_dir, TWO_PROCESS_LAYOUTS, tokens)
    seen = set()
    for per_rank in results:
        for layout, logits in per_rank.items():
            parity = compare(reference, logits)
            assert parity.within(1e-5), (family, layout, parity)
            seen.add(layout)
    assert seen == {"one process", *TWO_PROCESS_LAYOUTS}


def _loss_and_grads(rank, world_size, hf_dir, parallel, tokens):
    from tests.mcore_helpers import loss_and_grads

    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(hf_dir, parallel, dtype="float32")
    return loss_and_grads(chunks, tokens, arch.vocab_size)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_expert_parallel_training_step_equals_one_process(dispatcher, tiny_moe_models):
    """Every rank feeds the same tokens: each expert's gradient sums both ranks' tokens and megatron's DDP
    averages it over the data-parallel ranks, so it equals one process's (expert names are global)."""
    hf_dir = tiny_moe_models["qwen2_moe"]
    tokens = sample_tokens(load_arch(hf_dir).vocab_size, batch=4, seq=16, seed=1)
    (ref_loss, ref_grads), = run_distributed(_loss_and_grads, 1, hf_dir, ParallelConfig(), tokens)
    grads = {}
    for loss, rank_grads in run_distributed(_loss_and_grads, 2, hf_dir,
                                            ParallelConfig(expert=2, token_dispatcher=dispatcher), tokens):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        grads.update(rank_grads)
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(ref_grads[n].abs().sum() > 0 for n in ref_grads if "local_experts" in n)
