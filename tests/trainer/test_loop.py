"""End-to-end tiny runs on CPU: KL falls (means over steps of a fixed-data run), the same seed gives the
same curve at TP=1, TP=2 and PP=2, teacher == student gives KL 0, SFT mode trains, the SGLang engine drives
the same loop, and the metrics reach their sinks."""
import json
import os

import pytest

from tests.conftest import fixed_data, mean_falls
from tests.runs import REL, kl_curve, train
from tests.sglang_servers import rollout_at

LAYOUT_RUN = ("trainer.test_freq=2", "trainer.total_steps=6")


@pytest.fixture(scope="module")
def tp1_history(distill_setup, tmp_path_factory):
    return train(distill_setup, tmp_path_factory.mktemp("tp1"), *fixed_data(distill_setup), *LAYOUT_RUN)


def test_kl_falls_and_metrics_are_complete(tp1_history, distill_setup):
    curve = kl_curve(tp1_history)
    assert len(curve) == 6 and mean_falls(curve, 2), curve
    for key in ("actor/kl_loss", "actor/distillation_mode", "actor/grad_norm", "actor/lr", "response_length/mean",
                "timing_s/gen", "timing_s/teacher", "timing_s/update_actor", "timing_s/sync", "timing_s/step",
                "perf/tokens_per_s"):
        assert key in tp1_history[-1], key
    assert "val/accuracy" in tp1_history[1] and 0.0 <= tp1_history[1]["val/accuracy"] <= 1.0


@pytest.mark.parametrize("layout, world", [("parallel.tensor=2", 2), ("parallel.pipeline=2", 2)], ids=["tp2", "pp2"])
def test_same_seed_same_curve_across_layouts(tp1_history, distill_setup, tmp_path, layout, world):
    history = train(distill_setup, tmp_path, *fixed_data(distill_setup), *LAYOUT_RUN, layout, world_size=world)
    # TP/PP change the order of float32 reductions only.
    assert kl_curve(history) == pytest.approx(kl_curve(tp1_history), rel=REL)


def test_teacher_equal_to_student_gives_zero_kl(distill_setup, tmp_path):
    for kind in ("low_var_kl", "reverse"):
        history = train(distill_setup, tmp_path / kind, f"teacher.path={distill_setup['student']}",
                        "trainer.total_steps=1", f"actor.kl_loss_type={kind}")
        assert history[0]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
        assert history[0]["actor/grad_norm"] == pytest.approx(0.0, abs=1e-5)


# Not "kl" (k1): its gradient on a sampled token is the gradient of log pi(y), zero in expectation over the
# samples, so it gives no descent on any divergence to show (tests/loss/test_sampled.py checks its values).
@pytest.mark.parametrize("kind", ["forward", "jsd", "topk_reverse", "low_var_kl"])
def test_other_divergences_fall(distill_setup, tmp_path, kind):
    history = train(distill_setup, tmp_path, *fixed_data(distill_setup), f"actor.kl_loss_type={kind}", "actor.topk=8",
                    "trainer.total_steps=6", "actor.entropy_coeff=0.01" if kind == "forward" else "actor.entropy_coeff=0.0")
    assert mean_falls(kl_curve(history), 2), kl_curve(history)


def test_off_policy_and_mixed_batches(distill_setup, tiny_tokenizer, tmp_path):
    """lmbda=0: the divergence on the dataset's answers (supervised KD), every row off-policy; lmbda=0.5: half
    the prompts answered by the student, the KL of each part reported and the whole between them."""
    import pyarrow.parquet as pq

    given = ("data.response_key=extra_info.answer", "trainer.total_steps=2", "actor.kl_loss_type=forward")
    off = train(distill_setup, tmp_path / "off", *fixed_data(distill_setup), *given, "actor.lmbda=0")
    answers = [row["extra_info"]["answer"] for row in pq.read_table(distill_setup["fixed"]).to_pylist()]
    lengths = [len(tiny_tokenizer(a + tiny_tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for a in answers]
    for step in off:
        assert step["rollout/on_policy_fraction"] == 0.0 and "actor/kl_loss_on_policy" not in step
        assert step["response_length/mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert step["actor/kl_loss_off_policy"] == pytest.approx(step["actor/kl_loss"], rel=1e-6)
    mixed = train(distill_setup, tmp_path / "mixed", *given, "actor.lmbda=0.5")
    for step in mixed:
        parts = step["actor/kl_loss_on_policy"], step["actor/kl_loss_off_policy"]
        assert step["rollout/on_policy_fraction"] == 0.5 and min(parts) < step["actor/kl_loss"] < max(parts)


def test_sft_mode_lowers_cross_entropy(distill_setup, tmp_path):
    history = train(distill_setup, tmp_path, *fixed_data(distill_setup), "trainer.mode=sft",
                    "data.response_key=extra_info.answer", "trainer.total_steps=6", "actor.optim.lr=3e-3")
    losses = [h["actor/sft_loss"] for h in history]
    assert mean_falls(losses, 2), losses


def skip_worked_steps(setup, path):
    """The fixed prompts with data.response_skip_key spans over each answer's worked step (its "#### N" kept),
    written to `path`; and the rows."""
    import pyarrow.parquet as pq

    rows = pq.read_table(setup["fixed"]).to_pylist()
    for row in rows:
        row["extra_info"]["skip"] = [[0, row["extra_info"]["answer"].index("####")]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def kept_positions(tokenizer, row):
    """(prompt + answer ids, the positions that predict the kept answer tokens, those tokens)."""
    from megatron_opd.data.chat import encode_prompt

    answer = row["extra_info"]["answer"]
    prompt = encode_prompt(tokenizer, row["prompt"])
    kept = tokenizer(answer[answer.index("####"):] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    tokens = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert tokens[-len(kept):] == kept  # the span ends on a token boundary, so the kept tokens are these
    sequence = prompt + tokens
    return sequence, list(range(len(sequence) - len(kept) - 1, len(sequence) - 1)), kept


def test_sft_skips_the_marked_spans_of_a_response(distill_setup, tmp_path):
    """The first step's SFT loss is the token-mean cross-entropy (transformers' forward) over the response
    tokens outside data.response_skip_key's spans: the skipped tokens carry no loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = skip_worked_steps(distill_setup, tmp_path / "skip.jsonl")
    history = train(distill_setup, tmp_path / "run", f"data.train_files={tmp_path / 'skip.jsonl'}",
                    "data.shuffle=false", "trainer.mode=sft", "data.response_key=extra_info.answer",
                    "data.response_skip_key=extra_info.skip", "trainer.total_steps=1")
    tokenizer = AutoTokenizer.from_pretrained(distill_setup["student"])
    model = AutoModelForCausalLM.from_pretrained(distill_setup["student"], dtype=torch.float32)
    total, count = 0.0, 0
    for row in rows:
        sequence, positions, kept = kept_positions(tokenizer, row)
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, positions]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(kept), reduction="sum"))
        count += len(kept)
    assert history[0]["actor/sft_loss"] == pytest.approx(total / count, rel=1e-4)


def test_distillation_skips_the_marked_spans_of_the_given_responses(distill_setup, tmp_path):
    """actor.lmbda=0.5: the given responses of the prompts the student does not answer carry no loss on
    data.response_skip_key's spans; the first step's KL of that part is the token-mean forward KL (transformers'
    student and teacher, both at the rollout temperature) over their kept tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.trainer.rollouts import on_policy_prompts

    rows = skip_worked_steps(distill_setup, tmp_path / "skip.jsonl")
    history = train(distill_setup, tmp_path / "run", f"data.train_files={tmp_path / 'skip.jsonl'}",
                    "data.shuffle=false", "actor.lmbda=0.5", "data.response_key=extra_info.answer",
                    "data.response_skip_key=extra_info.skip", "actor.kl_loss_type=forward", "trainer.total_steps=1")
    tokenizer = AutoTokenizer.from_pretrained(distill_setup["student"])
    student, teacher = (AutoModelForCausalLM.from_pretrained(distill_setup[role], dtype=torch.float32)
                        for role in ("student", "teacher"))
    own = on_policy_prompts(len(rows), 0.5, seed=1, step=0)  # trainer.seed's default
    total, count = 0.0, 0
    for row in (row for i, row in enumerate(rows) if i not in own):
        sequence, positions, kept = kept_positions(tokenizer, row)
        with torch.no_grad():
            log_s, log_t = (torch.log_softmax(model(torch.tensor([sequence])).logits[0, positions] / 0.6, -1)
                            for model in (student, teacher))
        total += float((log_t.exp() * (log_t - log_s)).sum())
        count += len(kept)
    assert len(own) == 2 and history[0]["actor/kl_loss_off_policy"] == pytest.approx(total / count, rel=1e-4)


def test_sinks_write_their_files_over_one_epoch(tp1_history, distill_setup, tmp_path):
    """trainer.total_epochs=1 over 4 prompts in batches of 2: 2 steps (total_steps null)."""
    train(distill_setup, tmp_path, *fixed_data(distill_setup), "data.train_batch_size=2", "trainer.total_steps=null",
          "trainer.total_epochs=1", "trainer.logger=[console,jsonl,tensorboard,wandb]")
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    assert os.path.isdir(tmp_path / "wandb")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors") and os.path.isfile(tmp_path / "hf" / "config.json")


@pytest.mark.parametrize("layout, world", [("parallel.tensor=1", 1), ("parallel.tensor=2", 2)], ids=["tp1", "tp2"])
def test_sglang_engine_drives_the_loop(qwen_pair, sglang_pair_server, tmp_path, layout, world):
    """On the Qwen2.5-like pair, whose student has 20 padding rows past its 300 tokens: SGLang must not sample
    them (the trainer stops on a sampled padding id), which the logit bias it is given sees to. The server is
    the suite's, at rollout.url; the run pushes the student's weights to it at its start."""
    history = train(qwen_pair, tmp_path, *fixed_data(qwen_pair), *rollout_at(sglang_pair_server),
                    "trainer.total_steps=8", "actor.optim.lr=3e-3", "actor.kl_loss_type=reverse", layout,
                    world_size=world)
    curve = kl_curve(history)
    # SGLang samples with its own RNG, so its curve is its own: means over its ends, of the full-vocabulary KL
    # (a single-sample estimate is too noisy for 8 steps). Measured: 0.265 -> 0.041, as the embedded engine.
    assert mean_falls(curve, 3, factor=0.7), curve
