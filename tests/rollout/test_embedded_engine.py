"""The embedded engine has SGLang's output fields and numbers, and generates what transformers' `generate`
would: greedy tokens equal `generate`'s and SGLang's on the same weights, sampled first tokens follow the
distribution `generate` samples from (temperature, top-k, top-p) by a chi-square test, log-probs equal an
independent forward's and the Megatron student's, padding rows are never sampled, weight pushes take effect."""
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import chi2

from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import RolloutError, SamplingParams
from tests.conftest import FAMILIES
from tests.rollout.megatron_reference import megatron_run
from tests.rollout.test_sglang_engine import PROMPTS

DRAWS = 4000  # first tokens per distribution test
FALSE_ALARM = 1e-4  # chance that a correct sampler fails a chi-square test


@pytest.fixture(scope="module")
def embedded(tiny_models):
    with EmbeddedEngine(tiny_models["qwen2"]) as engine:
        yield engine


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _transformers_generate(model, rows, max_new_tokens, stop_ids):
    """Greedy continuations of `rows` as transformers' `generate` gives them (the embedded engine before its
    decode loop): (tokens up to and including the first stop, "stop" | "length") per row."""
    config = model.generation_config
    pad = config.pad_token_id
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=pad)
    results = []
    for tokens in out[:, width:].tolist():
        length = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), None)
        results.append((tokens[:length], "length" if length is None else "stop"))
    return results


def _token_logprobs(model, sample, temperature, vocab_size=None):
    """log-softmax(logits / T) at the sample's tokens, from one forward of prompt + response."""
    sequence = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(sequence).logits[0, len(sample.prompt_ids) - 1:-1, :vocab_size].double() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(tiny_models, family):
    """Rows of different lengths (left padding), n=2, rows stopping at different steps on their own stop
    tokens and others running to the length limit, a sliding window (mistral: 8) shorter than the text."""
    prompts = PROMPTS + [list(range(60, 72))]
    model = _hf_model(tiny_models[family])
    eos = {model.generation_config.eos_token_id}
    free = _transformers_generate(model, prompts, 20, eos)
    stops = eos | {free[0][0][3], free[1][0][5]}
    expected = _transformers_generate(model, [p for p in prompts for _ in range(2)], 20, stops)
    assert {reason for _, reason in expected} == {"stop", "length"}
    with EmbeddedEngine(tiny_models[family], max_batch=3) as engine:
        samples = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0, n=2,
                                                          stop_token_ids=tuple(stops - eos)))
    assert [s.prompt_ids for s in samples] == [p for p in prompts for _ in range(2)]
    assert [(s.response_ids, s.finish_reason) for s in samples] == expected
    for sample in samples:
        reference = _token_logprobs(model, sample, 1.0)
        assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64), reference, atol=1e-5)


def _filtered_probs(logits, sampling):
    """The distribution transformers' `generate` samples from: its own logits processors, in its order."""
    from transformers import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return processors(None, logits[None].double())[0].softmax(-1)


def _chi_square_p_value(counts, probs):
    """P-value of the counts under probs (cells expecting fewer than 5 draws pooled into one cell)."""
    expected = probs * counts.sum()
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    kept = expected > 0
    statistic = ((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    return chi2.sf(statistic, int(kept.sum()) - 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.05, -1, 1.0), (0.1, 8, 1.0), (0.1, -1, 0.5),
                                                        (0.1, 20, 0.5)],
                         ids=["temperature", "top-k", "top-p", "top-k+top-p"])
def test_sampled_first_tokens_follow_generates_distribution(tiny_models, tiny_tokenizer, family, temperature,
                                                           top_k, top_p):
    """The tiny models' logits are nearly flat (std 0.16), so low temperatures give a skewed distribution.
    The same draws are rejected under a temperature 50% higher: the test has the power to fail."""
    prompt, vocab = PROMPTS[2], len(tiny_tokenizer) - 2  # the bound keeps the last two ids out
    model = _hf_model(tiny_models[family])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1, :vocab]
    sampling = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, n=DRAWS,
                              seed=7, vocab_size=vocab)
    with EmbeddedEngine(tiny_models[family], max_batch=DRAWS) as engine:
        draws = engine.generate([prompt], sampling)
    tokens = torch.tensor([s.response_ids[0] for s in draws])
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert tokens.max() < vocab and len(counts) == vocab
    probs = _filtered_probs(logits, sampling)
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k / top-p set
    assert _chi_square_p_value(counts, probs) > FALSE_ALARM
    hotter = SamplingParams(**{**sampling.__dict__, "temperature": temperature * 1.5})
    assert _chi_square_p_value(counts, _filtered_probs(logits, hotter)) < FALSE_ALARM
    logprobs = torch.tensor([s.logprobs[0] for s in draws], dtype=torch.float64)
    assert torch.allclose(logprobs, (logits.double() / temperature).log_softmax(-1)[tokens], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_a_forward_and_seeds_reproduce(tiny_models, family):
    model = _hf_model(tiny_models[family])
    sampling = SamplingParams(max_new_tokens=16, temperature=0.7, top_k=50, top_p=0.9, n=3, seed=5)
    with EmbeddedEngine(tiny_models[family]) as engine:
        samples = engine.generate(PROMPTS, sampling)
        again = engine.generate(PROMPTS, sampling)
        other = engine.generate(PROMPTS, SamplingParams(**{**sampling.__dict__, "seed": 6}))
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    assert [s.response_ids for s in other] != [s.response_ids for s in samples]
    assert [s.prompt_ids for s in samples] == [p for p in PROMPTS for _ in range(3)]
    assert len({tuple(s.response_ids) for s in samples}) > len(PROMPTS)  # samples of one prompt differ
    eos = model.generation_config.eos_token_id
    for sample in samples:
        assert len(sample.logprobs) == len(sample.response_ids) and eos not in sample.response_ids[:-1]
        stopped = sample.response_ids[-1] == eos
        assert sample.finish_reason == ("stop" if stopped else "length") and (stopped or len(sample.logprobs) == 16)
        reference = _token_logprobs(model, sample, sampling.temperature)
        assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64), reference, atol=1e-4)


def test_weight_pushes_reach_the_decode_loop(tiny_models, tiny_tokenizer, tmp_path):
    other = write_tiny_checkpoint(str(tmp_path / "other"), "qwen3", seed=12, tokenizer=tiny_tokenizer)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    with EmbeddedEngine(other) as engine:
        expected = [s.response_ids for s in engine.generate(PROMPTS, greedy)]
    with EmbeddedEngine(tiny_models["qwen3"]) as engine:
        before = [s.response_ids for s in engine.generate(PROMPTS, greedy)]
        engine.update_weights(load_file(f"{other}/model.safetensors").items(), 3)
        after = engine.generate(PROMPTS, greedy)
    assert before != expected
    assert [s.response_ids for s in after] == expected and {s.weight_version for s in after} == {3}


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
    tokens = len(tiny_tokenizer)
    hot = SamplingParams(max_new_tokens=24, temperature=2.0, n=4, seed=0)
    with EmbeddedEngine(qwen_pair["student"]) as engine:
        unmasked = engine.generate(PROMPTS, hot)
        masked = engine.generate(PROMPTS, SamplingParams(**{**hot.__dict__, "vocab_size": tokens}))
    assert any(t >= tokens for s in unmasked for t in s.response_ids)  # without the bound, padding rows appear
    assert all(t < tokens for s in masked for t in s.response_ids)
    model = _hf_model(qwen_pair["student"])
    for sample in masked[:4]:
        assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64),
                              _token_logprobs(model, sample, 2.0, vocab_size=tokens), atol=1e-4)
