"""The embedded engine has SGLang's output fields and numbers: greedy tokens equal SGLang's on the same
weights, log-probs equal the Megatron student's, weight pushes take effect."""
import pytest

from megatron_opd.parallel import ParallelConfig
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import RolloutError, SamplingParams
from tests.rollout.megatron_reference import megatron_run
from tests.rollout.test_sglang_engine import PROMPTS


@pytest.fixture(scope="module")
def embedded(tiny_models):
    with EmbeddedEngine(tiny_models["qwen2"]) as engine:
        yield engine


def test_sampled_logprobs_equal_megatron(embedded, tiny_models):
    samples = embedded.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=0))
    assert [s.prompt_ids for s in samples] == [p for p in PROMPTS for _ in range(2)]
    reference, _ = megatron_run(tiny_models["qwen2"], [s.prompt_ids + s.response_ids for s in samples])
    for sample, ref in zip(samples, reference):
        assert len(sample.logprobs) == len(sample.response_ids) > 0
        assert sample.finish_reason in ("stop", "length") and sample.weight_version == 0
        assert max(abs(a - b) for a, b in zip(sample.logprobs, ref[len(sample.prompt_ids) - 1:])) <= 1e-4


def test_greedy_tokens_equal_sglang_on_the_same_weights(embedded, sglang_engine, tiny_models):
    _, tensors = megatron_run(tiny_models["qwen2"], [PROMPTS[0]], change_seed=11)
    version = max(embedded.weight_version, sglang_engine.weight_version) + 1
    sglang_engine.config.weight_sync = "tensor"
    for engine in (embedded, sglang_engine):
        engine.update_weights(tensors.items(), version)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    ours, theirs = embedded.generate(PROMPTS, greedy), sglang_engine.generate(PROMPTS, greedy)
    assert [s.response_ids for s in ours] == [s.response_ids for s in theirs]
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in theirs]
    for a, b in zip(ours, theirs):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4
    assert {s.weight_version for s in ours + theirs} == {version}


def test_scoring_and_bad_weight_push(embedded):
    scored = embedded.score([PROMPTS[0] + [1, 2]], top_k=2)[0]
    assert len(scored.token_logprobs) == 5 and len(scored.top_ids[0]) == 2
    with pytest.raises(RolloutError, match=r"model.not_a_weight is not a parameter"):
        embedded.update_weights([("model.not_a_weight", None)], 99)
    with pytest.raises(RolloutError, match=r"left .* parameters unset"):
        embedded.update_weights([], 99)


def test_padding_rows_are_never_sampled_and_log_probs_cover_the_tokens_only(qwen_pair, tiny_tokenizer):
    """The Qwen2.5-like student has 320 rows for 300 tokens; its random weights give the 20 padding rows
    real probability, which sampling past the tokens would show."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens = len(tiny_tokenizer)
    hot = SamplingParams(max_new_tokens=24, temperature=2.0, n=4, seed=0)
    with EmbeddedEngine(qwen_pair["student"]) as engine:
        unmasked = engine.generate(PROMPTS, hot)
        masked = engine.generate(PROMPTS, SamplingParams(**{**hot.__dict__, "vocab_size": tokens}))
    assert any(t >= tokens for s in unmasked for t in s.response_ids)  # without the bound, padding rows appear
    assert all(t < tokens for s in masked for t in s.response_ids)
    model = AutoModelForCausalLM.from_pretrained(qwen_pair["student"], dtype=torch.float32)
    sample = masked[0]
    sequence = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(sequence).logits[0, len(sample.prompt_ids) - 1:-1, :tokens].double() / 2.0
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64), expected, atol=1e-4)
