"""A real SGLang server on CPU serves a mixture-of-experts model (Qwen3-MoE, SGLang's native MoE path): its greedy
tokens equal transformers' `generate`, its scoring (a served MoE teacher) equals Megatron's log-probs at EP=2, and
the expert weights a trainer at EP=2 exports by their HF names, pushed by each route, are what it serves next.
Qwen2-MoE and Mixtral are not served here: SGLang's Qwen2-MoE gates its shared expert with a Triton kernel (GPU
only), and on this CPU its greedy tokens for Mixtral leave transformers' once the text passes the window (the GPU
smoke script runs MoE on a GPU)."""
import pytest
from safetensors.torch import load_file

from megatron_opd.parallel import ParallelConfig
from megatron_opd.rollout.engine import SamplingParams
from tests.rollout.megatron_reference import megatron_run
from tests.rollout.test_embedded_engine import _hf_model, _transformers_generate
from tests.rollout.test_sglang_engine import PROMPTS

EP2 = ParallelConfig(expert=2, token_dispatcher="alltoall")
SEQUENCES = [p + [11, 12, 13, 14] for p in PROMPTS]


@pytest.fixture(scope="module")
def at_ep2(served_moe):
    """Megatron at EP=2: the checkpoint's log-probs of SEQUENCES, and after a weight change, its log-probs and
    the HF tensors it exports (every expert, gathered over the expert-parallel ranks)."""
    own, _ = megatron_run(served_moe, SEQUENCES, EP2)
    changed, tensors = megatron_run(served_moe, SEQUENCES, EP2, change_seed=1)
    return own, changed, tensors


def _assert_scores(engine, expected):
    for result, ref in zip(engine.score(SEQUENCES, top_k=2), expected):
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4


def test_greedy_tokens_equal_transformers_generate(sglang_moe_engine, served_moe):
    model = _hf_model(served_moe)
    expected = _transformers_generate(model, PROMPTS, 10, {model.generation_config.eos_token_id})
    samples = sglang_moe_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert [(s.response_ids, s.finish_reason) for s in samples] == expected


def test_a_served_moe_teacher_scores_as_megatron_at_ep2(sglang_moe_engine, at_ep2):
    _assert_scores(sglang_moe_engine, at_ep2[0])


def test_expert_weights_pushed_by_hf_name_are_served_by_every_route(sglang_moe_engine, served_moe, at_ep2):
    own, changed, tensors = at_ep2
    assert {f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)} <= set(tensors)
    assert max(abs(a - b) for seq_own, seq_changed in zip(own, changed) for a, b in zip(seq_own, seq_changed)) > 1e-3
    checkpoint = load_file(f"{served_moe}/model.safetensors")
    # Each route serves weights other than the ones before it; the server ends with the checkpoint's again.
    for route, pushed, expected in (("tensor", tensors, changed), ("distributed", checkpoint, own),
                                    ("disk", tensors, changed), ("tensor", checkpoint, own)):
        sglang_moe_engine.config.weight_sync = route
        sglang_moe_engine.update_weights(pushed.items(), sglang_moe_engine.weight_version + 1)
        _assert_scores(sglang_moe_engine, expected)
