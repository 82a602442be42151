"""The README's example as a user runs it, on tiny models with the real pair's quirks (Qwen2.5-0.5B-Instruct
student, Qwen2.5-7B-Instruct teacher: one tokenizer, config vocabularies padded differently, a tied student
and an untied teacher, 14/2 against 28/4 heads): GSM8K preprocessing, the teacher converted to Megatron's
format, `opd-train` with the default kind, then `opd-generate` on the exported student; torchrun at TP=2 with
full-vocabulary reverse KL. ~1 min on 2 CPU cores."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# GSM8K prompts are 890 tokens at most with the tiny tokenizer (data.truncation=error checks them all at start-up).
TINY_RUN = ("data.train_batch_size=2", "rollout.n=2", "rollout.response_length=8", "actor.micro_batch_size=2",
            "data.max_prompt_length=1024", "trainer.total_steps=2", "trainer.logger=[jsonl]")


def run(*command, timeout=300):
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
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


@pytest.mark.parametrize("launcher, extra, answers", [
    ((BIN / "opd-train",), (), True),
    ((sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "megatron_opd.train"),
     ("parallel.tensor=2", "actor.kl_loss_type=reverse"), False),
], ids=["default-kind", "tp2-reverse"])
def test_the_seed_example_trains_and_its_student_answers(qwen_pair, teacher_mcore, gsm8k, tmp_path, launcher, extra,
                                                         answers):
    metrics = train(launcher, qwen_pair, teacher_mcore, gsm8k, tmp_path / "run", *extra)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["actor/kl_loss"]) and m["actor/kl_loss"] > 0 for m in metrics)
    exported = tmp_path / "run" / "hf"
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == 320 and config["tie_word_embeddings"]  # the student's own, padded past 300
    if not answers:  # opd-generate reads any exported student alike: once is enough
        return
    out = tmp_path / "answers.jsonl"
    printed = run(BIN / "opd-generate", f"model.path={exported}", f"data.val_files={gsm8k / 'test.parquet'}",
                  "data.max_prompt_length=1024", "max_prompts=4", "rollout.response_length=8", f"output={out}")
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 4 and all(row["data_source"] == "openai/gsm8k" and "response" in row for row in rows)
    assert "4 prompts x 1: accuracy" in printed
