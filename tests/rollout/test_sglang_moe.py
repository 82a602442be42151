"""A real SGLang server on CPU serves a mixture-of-experts model (Qwen3-MoE, SGLang's native MoE path): its greedy
tokens equal transformers' `generate`, its scoring (a served MoE teacher) equals Megatron's log-probs at EP=2, and
the expert weights a trainer at EP=2 exports by their HF names, pushed by each route, are what it serves next.
Qwen2-MoE and Mixtral are not served here: SGLang's Qwen2-MoE gates its shared expert with a Triton kernel (GPU
only), and its CPU attention does not apply Mixtral's window (the GPU smoke script runs MoE on a GPU)."""
import pytest
import torch

from megatron_opd.parallel import ParallelConfig
from megatron_opd.rollout.engine import SamplingParams
from tests.rollout.megatron_reference import megatron_run
from tests.rollout.test_embedded_engine import _hf_model, _transformers_generate
from tests.rollout.test_sglang_engine import PROMPTS

EP2 = ParallelConfig(expert=2, token_dispatcher="alltoall")


def test_greedy_tokens_equal_transformers_generate(sglang_moe_engine, served_moe):
    model = _hf_model(served_moe)
    expected = _transformers_generate(model, PROMPTS, 10, {model.generation_config.eos_token_id})
    samples = sglang_moe_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert [(s.response_ids, s.finish_reason) for s in samples] == expected


def test_a_served_moe_teacher_scores_as_megatron_at_ep2(sglang_moe_engine, served_moe):
    sequences = [p + [11, 12, 13, 14] for p in PROMPTS]
    reference, _ = megatron_run(served_moe, sequences, EP2)
    for result, ref in zip(sglang_moe_engine.score(sequences, top_k=2), reference):
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4


@pytest.mark.parametrize("route", ["tensor", "distributed", "disk"])
def test_expert_weights_pushed_by_hf_name_are_served(sglang_moe_engine, served_moe, route):
    sequences = [p + [11, 12, 13] for p in PROMPTS]
    seed = {"tensor": 1, "distributed": 2, "disk": 3}[route]
    new_logprobs, tensors = megatron_run(served_moe, sequences, EP2, change_seed=seed)
    assert {f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)} <= set(tensors)
    before = sglang_moe_engine.score(sequences)
    sglang_moe_engine.config.weight_sync = route
    sglang_moe_engine.update_weights(tensors.items(), sglang_moe_engine.weight_version + 1)
    scored = sglang_moe_engine.score(sequences)
    for old, result, ref in zip(before, scored, new_logprobs):
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4
        assert not torch.allclose(torch.tensor(old.token_logprobs), torch.tensor(ref), atol=1e-3)
