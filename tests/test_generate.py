"""opd-generate end to end: greedy answers scored, written as verl rows with a `response` column that SFT can
train on; the embedded and SGLang engines give the same greedy responses."""
import json
import subprocess
import sys

import pyarrow.parquet as pq

from megatron_opd.data.prompt_dataset import PromptDataset


def opd_generate(*overrides):
    done = subprocess.run([sys.executable, "-m", "megatron_opd.generate", *overrides], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_generate_writes_scored_rows_usable_for_sft(distill_setup, sglang_teacher, tiny_tokenizer, tmp_path):
    """The SGLang run answers from the suite's server (rollout.url), which serves the same teacher's weights."""
    common = [f"model.path={distill_setup['teacher']}", f"data.val_files={distill_setup['test']}",
              "rollout.response_length=12"]
    local_out, sglang_out = tmp_path / "local.jsonl", tmp_path / "sglang.parquet"
    printed = opd_generate(*common, f"output={local_out}")
    assert "8 prompts x 1: accuracy" in printed and "local engine" in printed
    local = [json.loads(line) for line in open(local_out)]
    assert len(local) == 8 and all(set(row["reward_model"]) == {"style", "ground_truth"} for row in local)
    assert all(row["score"] in (0.0, 1.0) for row in local)
    opd_generate(*common, f"output={sglang_out}", "rollout.engine=sglang", f"rollout.url={sglang_teacher.server.url}")
    served = pq.read_table(sglang_out).to_pylist()
    assert [row["response"] for row in served] == [row["response"] for row in local]
    as_sft = PromptDataset(str(local_out), tiny_tokenizer, max_prompt_length=128, response_key="response")
    assert as_sft[3]["response"] == local[3]["response"]


def test_bad_generate_config_fails_with_the_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "megatron_opd.generate", f"model.path={tmp_path}",
                           "data.val_files=x.parquet", "output=out.csv"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "output='out.csv': must end in .jsonl or .parquet" in done.stderr
