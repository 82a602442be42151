"""The embedded engine decodes mixture-of-experts students (qwen3_moe with a dense first layer, mixtral with a
window, qwen2_moe with its gated shared expert) as transformers does: greedy tokens equal `generate`'s,
log-probs its logits'; weight pushes by the checkpoints' per-expert names (the names the trainer exports) land
in the right slices of transformers' fused expert tensors."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import RolloutError, SamplingParams
from tests.conftest import MOE_FAMILIES
from tests.rollout.megatron_reference import megatron_run
from tests.rollout.test_embedded_engine import _hf_model, _token_logprobs, _transformers_generate
from tests.rollout.test_sglang_engine import PROMPTS

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
# DeepSeek-V3's multi-latent attention is not in the decode loop: the engine refuses it at start-up
# (test_a_student_it_cannot_decode_is_refused_at_start), so it is left out of the decoding tests.
DECODED = tuple(family for family in MOE_FAMILIES if family != "deepseek_v3")


@pytest.fixture(scope="module")
def windowed_qwen2_moe(tmp_path_factory, tiny_tokenizer):
    """Qwen2-MoE with per-layer windows: layers 0 and 2 attend to the last 6 positions, 1 and 3 to all."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("windowed") / "qwen2_moe"), "qwen2_moe", seed=3,
                                 tokenizer=tiny_tokenizer, use_sliding_window=True, sliding_window=6,
                                 max_window_layers=4)


@pytest.mark.parametrize("family", DECODED + ("qwen2_moe-windows",))
def test_greedy_tokens_equal_transformers_generate(tiny_moe_models, windowed_qwen2_moe, family):
    """Rows of different lengths (left padding), n=2, rows stopping at different steps on their own stop
    tokens and others running to the length limit, windows shorter than the text."""
    model_dir = windowed_qwen2_moe if family == "qwen2_moe-windows" else tiny_moe_models[family]
    prompts = PROMPTS + [list(range(60, 72))]
    model = _hf_model(model_dir)
    eos = {model.generation_config.eos_token_id}
    free = _transformers_generate(model, prompts, 20, eos)
    stops = eos | {free[0][0][3], free[1][0][5]}
    expected = _transformers_generate(model, [p for p in prompts for _ in range(2)], 20, stops)
    assert {reason for _, reason in expected} == {"stop", "length"}
    with EmbeddedEngine(model_dir, max_batch=3) as engine:
        samples = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0, n=2,
                                                          stop_token_ids=tuple(stops - eos)))
    assert [(s.response_ids, s.finish_reason) for s in samples] == expected
    for sample in samples:
        reference = _token_logprobs(model, sample, 1.0)
        assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64), reference, atol=1e-5)


@pytest.mark.parametrize("family", DECODED)
def test_per_expert_weight_pushes_equal_a_fresh_engine(tiny_moe_models, tiny_tokenizer, tmp_path, family):
    other = write_tiny_checkpoint(str(tmp_path / "other"), family, seed=12, tokenizer=tiny_tokenizer)
    tensors = load_file(f"{other}/model.safetensors")
    assert any(".experts.3." in name for name in tensors)  # checkpoints name each expert's matrices
    with EmbeddedEngine(other) as fresh:
        expected = fresh.generate(PROMPTS, GREEDY)
        fresh_params = {name: param.clone() for name, param in fresh.model.named_parameters()}
    with EmbeddedEngine(tiny_moe_models[family]) as engine:
        before = engine.generate(PROMPTS, GREEDY)
        engine.update_weights(tensors.items(), 3)
        after = engine.generate(PROMPTS, GREEDY)
        params = dict(engine.model.named_parameters())
    assert [s.response_ids for s in before] != [s.response_ids for s in expected]
    assert [(s.response_ids, s.logprobs) for s in after] == [(s.response_ids, s.logprobs) for s in expected]
    assert {s.weight_version for s in after} == {3}
    assert params.keys() == fresh_params.keys()
    assert all(torch.equal(params[name], fresh_params[name]) for name in params)


@pytest.mark.parametrize("family", DECODED)
def test_the_trainers_export_reaches_the_experts(tiny_moe_models, family):
    """The trainer's route: the Megatron student, changed, exported by HF names (per expert) and pushed; the
    engine's log-probs then equal the changed student's."""
    with EmbeddedEngine(tiny_moe_models[family]) as engine:
        sample = engine.generate([PROMPTS[2]], GREEDY)[0]
        sequence = sample.prompt_ids + sample.response_ids
        reference, tensors = megatron_run(tiny_moe_models[family], [sequence], change_seed=11)
        before = engine.score([sequence])[0].token_logprobs
        engine.update_weights(tensors.items(), 1)
        after = engine.score([sequence])[0].token_logprobs
    assert any(".experts.3." in name for name in tensors)
    assert max(abs(a - b) for a, b in zip(before, reference[0])) > 1e-3  # the change shows
    assert max(abs(a - b) for a, b in zip(after, reference[0])) <= 1e-5


def test_expert_pushes_name_what_is_wrong_or_missing(tiny_moe_models):
    """Mixtral: its checkpoint names (block_sparse_moe, w1/w2/w3) differ most from its module's."""
    model_dir = tiny_moe_models["mixtral"]
    tensors = load_file(f"{model_dir}/model.safetensors")
    expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with EmbeddedEngine(model_dir) as engine:
        expected = engine.generate(PROMPTS, GREEDY)
        with pytest.raises(RolloutError, match=r"left 1 parameters unset, e\.g\. \['model\.layers\.1\.block_sparse"
                                               r"_moe\.experts\.2\.w3\.weight'\]"):
            engine.update_weights([(n, t) for n, t in tensors.items() if n != expert], 1)
        with pytest.raises(RolloutError, match=r"experts\.4\.w1\.weight is not a parameter"):
            engine.update_weights([(expert.replace("2.w3", "4.w1"), tensors[expert])], 1)
        with pytest.raises(RolloutError, match=r"experts\.2\.w3\.weight has shape \[64, 128\], the model's is "
                                               r"\[128, 64\]"):
            engine.update_weights([(expert, tensors[expert].t())], 1)
        # The module's own names, fused experts included, are a complete push too.
        engine.update_weights([(name, param.clone()) for name, param in engine.model.named_parameters()], 2)
        assert [s.response_ids for s in engine.generate(PROMPTS, GREEDY)] == [s.response_ids for s in expected]


def test_a_student_it_cannot_decode_is_refused_at_start(tiny_moe_models):
    engine = EmbeddedEngine(tiny_moe_models["deepseek_v3"])
    with pytest.raises(ValueError, match=r"model_type 'deepseek_v3': the embedded engine's decode loop implements "
                                         r".*; generate with rollout\.engine=sglang"):
        engine.start()
