"""A real SGLang 0.5.23 server on CPU (with the FAKE kernel package on its path): its log-probs equal the
Megatron student's, weight syncs by all three routes make it serve the new weights, teacher scoring equals
the Megatron teacher, the colocated switch leaves a CPU server alone, and a killed server is restarted with
the current weights mid-batch."""
import os

import pytest

from megatron_opd.parallel import ParallelConfig
from megatron_opd.rollout.engine import SamplingParams
from tests.rollout.megatron_reference import megatron_run

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 17, 3, 250, 9]]


def _sequences(samples):
    return [s.prompt_ids + s.response_ids for s in samples]


@pytest.mark.parametrize("tp", [1, 2])
def test_sampled_logprobs_equal_megatron_student(sglang_student, tiny_models, tp):
    samples = sglang_student.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=3))
    assert len(samples) == 6 and all(len(s.response_ids) > 0 for s in samples)
    reference, _ = megatron_run(tiny_models["qwen2"], _sequences(samples), ParallelConfig(tensor=tp))
    for sample, ref in zip(samples, reference):
        response_ref = ref[len(sample.prompt_ids) - 1:]
        assert max(abs(a - b) for a, b in zip(sample.logprobs, response_ref)) <= 1e-4


def test_teacher_scoring_equals_megatron(sglang_student, tiny_models):
    sequences = [p + [11, 12, 13, 14] for p in PROMPTS]
    scored = sglang_student.score(sequences, top_k=3)
    reference, _ = megatron_run(tiny_models["qwen2"], sequences, ParallelConfig(tensor=2))
    for result, ref, seq in zip(scored, reference, sequences):
        assert len(result.token_logprobs) == len(seq) - 1
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4
        assert all(len(ids) == 3 and lps == sorted(lps, reverse=True) for ids, lps in zip(result.top_ids, result.top_logprobs))
        assert all(lps[0] >= lp - 1e-6 for lps, lp in zip(result.top_logprobs, result.token_logprobs))


@pytest.mark.parametrize("route", ["tensor", "distributed", "disk"])
def test_weight_sync_serves_the_new_weights(sglang_engine, tiny_models, route):
    sequences = [p + [11, 12, 13] for p in PROMPTS]
    seed = {"tensor": 1, "distributed": 2, "disk": 3}[route]
    new_logprobs, tensors = megatron_run(tiny_models["qwen2"], sequences, ParallelConfig(tensor=2), change_seed=seed)
    sglang_engine.config.weight_sync = route
    version = sglang_engine.weight_version + 1
    sglang_engine.update_weights(tensors.items(), version)
    scored = sglang_engine.score(sequences)
    for result, ref in zip(scored, new_logprobs):
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4
    sample = sglang_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0]
    assert sglang_engine.weight_version == sample.weight_version == version


def test_colocated_switch_leaves_a_cpu_server_serving(sglang_student, monkeypatch):
    # A CPU server has no memory saver: releasing its memory would kill it, so sleep/wake_up must not try.
    monkeypatch.setattr(sglang_student.config, "colocated", True)
    pid, restarts = sglang_student.server.process.pid, sglang_student.restarts
    sglang_student.sleep()
    sample = sglang_student.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    sglang_student.wake_up()
    assert len(sample.response_ids) == 4 and sample.weight_version == sglang_student.weight_version
    assert sglang_student.server.process.pid == pid and sglang_student.restarts == restarts
    assert sglang_student.server.healthy()


def test_killed_server_is_restarted_with_the_current_weights(sglang_engine, tiny_models, monkeypatch):
    sequences = [p + [11, 12, 13] for p in PROMPTS]
    current, tensors = megatron_run(tiny_models["qwen2"], sequences, ParallelConfig(), change_seed=7)
    sglang_engine.config.weight_sync = "tensor"
    sglang_engine.update_weights(tensors.items(), sglang_engine.weight_version + 1)
    restarts, requests_sent, send = sglang_engine.restarts, [], sglang_engine._post

    def send_then_kill(body):
        # SIGKILL the server once the batch is under way: requests in flight and after meet a dead server.
        requests_sent.append(body)
        if len(requests_sent) == 3:
            os.killpg(sglang_engine.server.process.pid, 9)
            sglang_engine.server.process.wait()
        return send(body)

    monkeypatch.setattr(sglang_engine, "_post", send_then_kill)
    samples = sglang_engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=50, temperature=1.0))
    assert sglang_engine.restarts == restarts + 1
    assert len(samples) == 12 and all(s.weight_version == sglang_engine.weight_version for s in samples)
    for result, ref in zip(sglang_engine.score(sequences), current):
        assert max(abs(a - b) for a, b in zip(result.token_logprobs, ref)) <= 1e-4
