"""The README's example as a user runs it, on tiny models with the real pair's quirks (Qwen2.5-0.5B-Instruct
student, Qwen2.5-7B-Instruct teacher: one tokenizer, config vocabularies padded differently, a tied student
and an untied teacher, 14/2 against 28/4 heads): GSM8K preprocessing, the teacher converted to Megatron's
format, `opd-train` with the default kind written in verl's keys (as pasted from verl's distillation doc, its
metrics those of the same run in this project's keys, in process), then `opd-generate` on the exported student
in verl's main_generation keys; torchrun at TP=2 with full-vocabulary reverse KL. ~1.5 min on 2 CPU cores."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.config import to_config
from tests.config.test_verl_keys import config, seed_overrides
from tests.conftest import run_distributed
from tests.runs import RUN_TIMEOUT_S, learning

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# GSM8K prompts are 890 tokens at most with the tiny tokenizer (data.truncation=error checks them all at start-up).
TINY_RUN = ("data.train_batch_size=2", "rollout.n=2", "rollout.response_length=8", "actor.micro_batch_size=2",
            "data.max_prompt_length=1024", "trainer.total_steps=2", "trainer.logger=[jsonl]")


def run(*command, timeout=300, env=None):
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory, gsm8k_dir):
    out = tmp_path_factory.mktemp("gsm8k")
    run(sys.executable, ROOT / "examples" / "data_preprocess" / "gsm8k.py", "--local_save_dir", out,
        "--input_dir", gsm8k_dir)
    return out


@pytest.fixture(scope="module")
def teacher_mcore(qwen_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "mcore"
    run(BIN / "opd-convert", "hf-to-mcore", "--hf", qwen_pair["teacher"], "--out", out)
    return out


def train(launcher, pair, teacher, gsm8k, save_dir, *extra):
    run(*launcher, "--config-name=distillation_trainer", f"student.path={pair['student']}", f"teacher.path={teacher}",
        f"data.train_files={gsm8k / 'train.parquet'}", f"data.val_files={gsm8k / 'test.parquet'}",
        f"trainer.save_dir={save_dir}", *TINY_RUN, *extra)
    return [json.loads(line) for line in open(save_dir / "metrics.jsonl")]


def _train(rank, world_size, cfg):
    from megatron_opd.trainer.loop import Trainer

    Trainer(cfg).train()


def assert_same_learning(actual: dict, expected: dict) -> None:
    """Every metric but the clock's, each step, to rel 1e-6."""
    assert sorted(actual) == sorted(expected)
    for step, line in expected.items():
        assert sorted(actual[step]) == sorted(line), step
        for key, value in line.items():
            assert actual[step][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def test_the_seed_doc_command_in_verl_keys_trains_as_ours_and_its_student_answers(qwen_pair, teacher_mcore, gsm8k,
                                                                                  tmp_path):
    verl_run, our_run = tmp_path / "verl", tmp_path / "ours"
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process run's workers use one thread
    run(BIN / "opd-train", "--config-name=distillation_megatron_trainer",
        *seed_overrides(gsm8k, qwen_pair["student"], teacher_mcore, verl_run, verl=True), env=one_thread)
    cfg = config("distillation_trainer", seed_overrides(gsm8k, qwen_pair["student"], teacher_mcore, our_run,
                                                        verl=False), to_config)
    run_distributed(_train, 1, cfg, timeout_s=RUN_TIMEOUT_S)
    assert sorted(learning(verl_run)) == [1, 2]
    assert all(math.isfinite(m["actor/kl_loss"]) and m["actor/kl_loss"] > 0 for m in learning(verl_run).values())
    assert_same_learning(learning(verl_run), learning(our_run))
    exported = verl_run / "hf"
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["vocab_size"] == 320 and hf_config["tie_word_embeddings"]  # the student's own, past 300
    out = tmp_path / "answers.jsonl"
    printed = run(BIN / "opd-generate", f"actor_rollout_ref.model.path={exported}",
                  f"data.path={gsm8k / 'test.parquet'}", "rollout.prompt_length=1024", "max_prompts=4",
                  "rollout.response_length=8", "data.n_samples=1", "rollout.do_sample=False", f"data.output_path={out}",
                  "trainer.n_gpus_per_node=1", "trainer.nnodes=1")
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 4 and all(row["data_source"] == "openai/gsm8k" and "response" in row for row in rows)
    assert "4 prompts x 1: accuracy" in printed


def test_the_seed_example_at_tp2_with_reverse_kl(qwen_pair, teacher_mcore, gsm8k, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "megatron_opd.train")
    metrics = train(launcher, qwen_pair, teacher_mcore, gsm8k, tmp_path / "run", "parallel.tensor=2",
                    "actor.kl_loss_type=reverse")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["actor/kl_loss"]) and m["actor/kl_loss"] > 0 for m in metrics)
    hf_config = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == 320 and hf_config["tie_word_embeddings"]
