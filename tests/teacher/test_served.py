"""The teacher on its own SGLang server (teacher.engine=sglang), on the real CPU server: its scores equal the
Megatron teacher's (1e-4) — sampled-token log-probs and top-k, with padding ids dropped from the top-k —
while SGLang ignores a request's temperature when scoring; a training curve with the served teacher equals
the co-located one; refused configurations name their key; a server at teacher.url is used, never started
or stopped; a server rank 0 started is restarted when it dies and stopped by close().

The scores and curves come from the suite's shared server (tests/sglang_servers.py) serving the teacher's
weights, which the workers reach through teacher.url. The restart and the stop need a server a ServedTeacher
started itself: one built in this process as rank 0 of a one-process run (a forked worker's server would die
with the worker)."""
import os
import signal
import socket

import psutil
import pytest
import requests
import torch

from megatron_opd.config import ConfigError, to_config
from megatron_opd.parallel import ParallelConfig, ParallelDims
from megatron_opd.rollout.sglang_server import ServerAt, ServerStartError
from megatron_opd.teacher.served import ServedTeacher
from tests.conftest import distill_overrides, fixed_data, run_distributed
from tests.runs import composed, kl_curve, train
from tests.sglang_servers import SGLANG_STUB, served_by

VOCAB = 300  # the tiny tokenizer's length, and the teacher's configured vocabulary
TOPK = 8
DROPPED = 20  # ids a run that shares only VOCAB - DROPPED ids treats as padding rows
SERVED = ("teacher.engine=sglang", "actor.kl_temperature=1.0", f"teacher.sglang.pythonpath=[{SGLANG_STUB}]",
          "teacher.sglang.dtype=float32", "teacher.sglang.max_total_tokens=4096",
          "teacher.sglang.startup_timeout_s=240", "teacher.sglang.request_timeout_s=120")
SAMPLED, TOP_K = ("actor.kl_loss_type=low_var_kl",), ("actor.kl_loss_type=topk_reverse", f"actor.topk={TOPK}")


def served_config(setup, save_dir, *extra):
    return to_config(composed(*distill_overrides(setup, save_dir, *SERVED, "trainer.export_hf=false", *extra)))


def this_process_as_rank_0() -> ParallelDims:
    """The place of a one-process run's rank 0, without a process group (ServedTeacher's constructor needs none)."""
    return ParallelDims(config=ParallelConfig(), device=torch.device("cpu"), world_size=1, rank=0, tp_rank=0,
                        pp_rank=0, cp_rank=0, dp_rank=0, tp_group=None, pp_group=None, cp_group=None, dp_group=None,
                        is_first_stage=True, is_last_stage=True)


def served(cfg, dims, vocab_size) -> ServedTeacher:
    """The run's one teacher (teacher.*) on its server."""
    return ServedTeacher(cfg, cfg.teacher, dims, vocab_size)


@pytest.fixture(scope="module")
def started(distill_setup, tmp_path_factory):
    teacher = served(served_config(distill_setup, tmp_path_factory.mktemp("served"), *SAMPLED), this_process_as_rank_0(), VOCAB)
    yield teacher
    teacher.close()


def test_configs_a_served_teacher_cannot_run_are_refused(distill_setup, tmp_path):
    refused = {
        ("actor.kl_loss_type=reverse",): r"actor.kl_loss_type='reverse': needs the teacher's whole distribution.*"
                                         r"kl\|abs\|mse\|low_var_kl.*topk_forward\|topk_reverse",
        ("actor.kl_temperature=0.6",): r"actor.kl_temperature=0.6: the divergence would run at temperature 0.6.*"
                                       r"SGLang applies no temperature.*Set actor.kl_temperature=1.0",
        ("actor.kl_temperature=null",): r"actor.kl_temperature=None: .*temperature 0.6 \(null: rollout.temperature\)",
        ("teacher.parallel.tensor=2",): r"teacher.parallel.tensor=2: is the Megatron teacher's layout",
    }
    for extra, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            served_config(distill_setup, tmp_path, *extra)
    with pytest.raises(ConfigError, match=r"teacher.url='http://127.0.0.1:1': .*set teacher.engine=sglang"):
        to_config(composed(*distill_overrides(distill_setup, tmp_path, "teacher.url=http://127.0.0.1:1")))
    with pytest.raises(ConfigError, match=r"teacher.url='127.0.0.1:1': must be the server's http\(s\)://"):
        served_config(distill_setup, tmp_path, "teacher.url=127.0.0.1:1")


def test_a_converted_checkpoint_or_a_silent_url_stops_start_up(distill_setup, tmp_path):
    converted = tmp_path / "mcore"  # a converted checkpoint's config, without HF weights (is_hf_dir decides)
    converted.mkdir()
    (converted / "config.json").write_text(open(os.path.join(distill_setup["teacher"], "config.json")).read())
    cfg = served_config(distill_setup, tmp_path, f"teacher.path={converted}")
    with pytest.raises(ConfigError, match=rf"teacher.path={converted}: a converted Megatron checkpoint.*"
                                          rf"opd-convert mcore-to-hf --mcore {converted} --out DIR"):
        served(cfg, this_process_as_rank_0(), VOCAB)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(ServerStartError, match=rf"teacher.url={url}: no SGLang server answers"):
            served(served_config(distill_setup, tmp_path, f"teacher.url={url}"), this_process_as_rank_0(), VOCAB)
        cfg.teacher.sglang.startup_timeout_s = 1.0
        with pytest.raises(ServerStartError, match="stopped answering /health for 1 s"):
            ServerAt(url, cfg.teacher.sglang, "teacher.url").start()  # how a lost request's retry waits, bounded


SAMPLES = [([5, 17, 42, 99, 7], [250, 3, 18, 77, 101, 12]), ([9, 33, 61, 120, 200, 8, 14], [15, 160, 70]),
           ([40, 41, 42], [43, 44, 45, 46, 47, 48, 49, 50, 51, 52]), ([180, 2, 60, 61, 62, 63], [64, 279])]


def _both_teachers(rank, world_size, sampled_cfg, topk_cfg):
    """Per case, the Megatron teacher's and the served teacher's outputs on SAMPLES and the top_k of each
    scoring request; the Megatron teacher's at temperature 0.5, and the served log-probs of a request that
    asks for temperature 0.5."""
    from megatron_opd.models.batch import build_batch
    from megatron_opd.parallel import initialize_model_parallel
    from megatron_opd.teacher import MegatronTeacher

    dims = initialize_model_parallel(ParallelConfig())
    batch = build_batch([p for p, _ in SAMPLES], [r for _, r in SAMPLES], 3, dims.device)
    micro = batch.micro_batches(sampled_cfg.actor.micro_batch_size)

    def megatron_outputs(cfg, vocab_size, temperature=1.0):
        teacher = MegatronTeacher(cfg.teacher.path, "float32", dims, None, cfg.actor, temperature, vocab_size, VOCAB)
        return teacher.outputs(SAMPLES, batch, micro)

    results = {}
    for case, cfg, vocab_size in (("sampled", sampled_cfg, VOCAB), ("topk", topk_cfg, VOCAB),
                                  ("topk_padded", topk_cfg, VOCAB - DROPPED)):
        teacher, asked = served(cfg, dims, vocab_size), []
        score = teacher.engine.score

        def recorded_score(sequences, top_k=0):
            asked.append(top_k)
            return score(sequences, top_k)

        teacher.engine.score = recorded_score
        results[case] = (megatron_outputs(cfg, vocab_size), teacher.outputs(SAMPLES, batch, micro), asked)
        teacher.close()
    results["megatron_t05"] = megatron_outputs(sampled_cfg, VOCAB, temperature=0.5)
    body = {"input_ids": SAMPLES[0][0] + SAMPLES[0][1], "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.5}}
    meta = requests.post(sampled_cfg.teacher.url + "/generate", json=body, timeout=60).json()["meta_info"]
    results["served_asked_t05"] = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
    return results


def real_positions(outputs, name):
    """Per sequence, the values at its positions 0 .. len - 2 (each predicts a token of the sequence)."""
    rows = torch.cat([mb[name] for mb in outputs])
    return [rows[i, :len(p) + len(r) - 1] for i, (p, r) in enumerate(SAMPLES)]


def sorted_by_id(outputs):
    """(ids, log-probs) per sequence with each position's top-k in id order (the loss ignores the order)."""
    pairs = []
    for ids, logprobs in zip(real_positions(outputs, "topk_ids"), real_positions(outputs, "topk_logprobs")):
        ids, order = ids.sort(-1)
        pairs.append((ids, logprobs.gather(-1, order)))
    return pairs


@pytest.fixture(scope="module")
def both_teachers(sglang_engine, distill_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("both")
    url = f"teacher.url={served_by(sglang_engine, distill_setup['teacher']).server.url}"
    return run_distributed(_both_teachers, 1, served_config(distill_setup, root / "sampled", *SAMPLED, url),
                           served_config(distill_setup, root / "topk", *TOP_K, url))[0]


def test_served_log_probs_equal_the_megatron_teachers(both_teachers):
    megatron, served, asked = both_teachers["sampled"]
    assert asked == [0]
    errors = [(m - s).abs().max().item() for m, s in
              zip(real_positions(megatron, "logprobs"), real_positions(served, "logprobs"))]
    print(f"sampled-token log-probs, max |served - megatron|: {max(errors):.2e}")
    assert max(errors) <= 1e-4
    assert served[0]["logprobs"].shape == megatron[0]["logprobs"].shape == (2, 13)  # the longest sequence


def test_served_top_k_equals_the_megatron_teachers(both_teachers):
    megatron, served, asked = both_teachers["topk"]
    assert asked == [TOPK]  # no padding rows in a teacher whose vocabulary is the tokenizer's
    errors = []
    for (m_ids, m_lp), (s_ids, s_lp) in zip(sorted_by_id(megatron), sorted_by_id(served)):
        assert torch.equal(m_ids, s_ids)
        errors.append((m_lp - s_lp).abs().max().item())
    print(f"top-{TOPK} log-probs, max |served - megatron|: {max(errors):.2e}")
    assert max(errors) <= 1e-4


def test_padding_ids_leave_the_top_k_and_its_normalisation_differs(both_teachers):
    """Ids at or above the shared vocabulary are dropped from the served top-k (sequences holding them are
    scored again with room for them): the ids are the Megatron teacher's, which masks those rows. The
    log-probs stay normalised over the whole vocabulary: below Megatron's by the same log of the shared
    vocabulary's mass at each position."""
    megatron, served, asked = both_teachers["topk_padded"]
    assert asked == [TOPK, TOPK + DROPPED]
    for (m_ids, m_lp), (s_ids, s_lp) in zip(sorted_by_id(megatron), sorted_by_id(served)):
        assert torch.equal(m_ids, s_ids) and int(s_ids.max()) < VOCAB - DROPPED
        shift = s_lp - m_lp
        assert (shift - shift[:, :1]).abs().max().item() <= 1e-4
        assert shift.max().item() < -0.01  # the 20 dropped ids of 300 hold ~7 % of a near-uniform mass


def test_sglang_scores_at_temperature_one_whatever_the_request_says(both_teachers):
    """Why actor.kl_temperature must be 1 with a served teacher: SGLang 0.5.23 computes input log-probs
    from the raw logits (logprob_processor.InputLogprobProcessor: log_softmax without the temperature)."""
    at_one = real_positions(both_teachers["sampled"][0], "logprobs")[0]
    at_half = real_positions(both_teachers["megatron_t05"], "logprobs")[0]
    asked_half = torch.tensor(both_teachers["served_asked_t05"])
    assert (asked_half - at_one).abs().max().item() <= 1e-4
    assert (asked_half - at_half).abs().max().item() > 0.1


def test_a_server_at_teacher_url_is_used_and_left_running(sglang_teacher, distill_setup, tmp_path):
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    teacher = served(served_config(distill_setup, tmp_path, f"teacher.url={sglang_teacher.server.url}"),
                     this_process_as_rank_0(), VOCAB)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children  # no second server
    sequence = SAMPLES[0][0] + SAMPLES[0][1]
    assert teacher.engine.score([sequence])[0].token_logprobs == sglang_teacher.score([sequence])[0].token_logprobs
    teacher.close()
    teacher.close()
    assert sglang_teacher.healthy() and teacher.url is None


CURVE_RUN = ("trainer.total_steps=4",)


@pytest.mark.parametrize("kind, world", [(SAMPLED, 1), (TOP_K, 2)], ids=["low_var_kl", "topk_reverse_dp2"])
def test_curve_with_the_served_teacher_equals_the_co_located_ones(sglang_teacher, distill_setup, tmp_path, kind,
                                                                  world):
    common = (*fixed_data(distill_setup), *CURVE_RUN, *kind, "actor.kl_temperature=1.0", "trainer.export_hf=false")
    co_located = train(distill_setup, tmp_path / "megatron", *common, world_size=world)
    served = train(distill_setup, tmp_path / "sglang", *common, *SERVED, f"teacher.url={sglang_teacher.server.url}",
                   world_size=world)
    gaps = [abs(s - m) / abs(m) for s, m in zip(kl_curve(served), kl_curve(co_located))]
    print(f"{kind[0]} x {world}: co-located {kl_curve(co_located)}, served {kl_curve(served)}, max rel gap "
          f"{max(gaps):.1e}")
    # The rollouts come from the same embedded engine with the same seeds, and the teacher's numbers differ by
    # float32 rounding only (~5e-7 in the log-probs): measured max rel gap 8e-7 (low_var_kl), 2e-7 (topk).
    assert kl_curve(served) == pytest.approx(kl_curve(co_located), rel=1e-5)
    # Rank 0 holds every row: alone it sends nothing; at DP=2 it sends rank 1 half the rows, K ids (int64)
    # and K log-probs (fp32) per token.
    assert served[0]["teacher/bytes_moved_per_token"] == (0.0 if world == 1 else TOPK * (8 + 4) / 2)


def test_a_server_that_dies_is_restarted_and_the_batch_retried(started):
    sequence = SAMPLES[1][0] + SAMPLES[1][1]
    before = started.engine.score([sequence])[0].token_logprobs
    os.killpg(started.engine.server.process.pid, signal.SIGKILL)
    after = started.engine.score([sequence])[0].token_logprobs
    assert started.engine.restarts == 1 and after == pytest.approx(before, abs=1e-6)


def test_close_stops_the_server_it_started(started):
    url, process = started.url, started.engine.server.process
    started.close()
    started.close()
    assert process.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)
