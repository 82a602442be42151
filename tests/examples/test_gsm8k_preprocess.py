"""examples/data_preprocess/gsm8k.py on the real GSM8K files: row counts, verl's schema, round trips through
pyarrow and `datasets`, the prompt dataset, the scorer on the gold answers; and its errors on bad input."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import datasets
import pyarrow.parquet as pq
import pytest

from megatron_opd.data import ROW_SCHEMA, DataError, PromptDataset, accuracy

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "data_preprocess" / "gsm8k.py"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

def load_script():
    spec = importlib.util.spec_from_file_location("gsm8k_preprocess", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, gsm8k_dir):
    out = tmp_path_factory.mktemp("gsm8k")
    result = subprocess.run([sys.executable, str(SCRIPT), "--local_save_dir", str(out), "--input_dir", str(gsm8k_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"train: 7473 rows -> {out / 'train.parquet'}" in result.stdout
    return out


def source_records(gsm8k_dir, split):
    return [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("split, rows", [("train", 7473), ("test", 1319)])
def test_rows_and_schema(preprocessed, gsm8k_dir, split, rows):
    table = pq.read_table(preprocessed / f"{split}.parquet")
    assert table.num_rows == rows and table.schema == ROW_SCHEMA
    records, source = table.to_pylist(), source_records(gsm8k_dir, split)
    assert len(source) == rows
    for index in (0, 1, rows // 2, rows - 1):
        record, original = records[index], source[index]
        assert record == {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{original['question']} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule",
                             "ground_truth": original["answer"].split("#### ")[-1].replace(",", "")},
            "extra_info": {"split": split, "index": index, "question": original["question"],
                           "answer": original["answer"]},
        }
    assert all(r["reward_model"]["ground_truth"].lstrip("-").isdigit() for r in records)
    assert accuracy([r["extra_info"]["answer"] for r in records],
                    [r["reward_model"]["ground_truth"] for r in records]) == 1.0


def test_round_trip_through_datasets_and_pyarrow(preprocessed, tmp_path):
    train = datasets.Dataset.from_parquet(str(preprocessed / "train.parquet"), cache_dir=str(tmp_path / "cache"))
    assert train.num_rows == 7473
    assert train.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    original = pq.read_table(preprocessed / "train.parquet").to_pylist()
    assert train[5] == original[5]
    train.to_parquet(str(tmp_path / "again.parquet"))
    again = pq.read_table(tmp_path / "again.parquet")
    assert again.to_pylist() == original
    files = {split: str(preprocessed / f"{split}.parquet") for split in ("train", "test")}
    both = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert (both["train"].num_rows, both["test"].num_rows) == (7473, 1319)


def test_prompt_dataset_reads_the_output(preprocessed, tiny_tokenizer):
    dataset = PromptDataset([str(preprocessed / "train.parquet"), str(preprocessed / "test.parquet")],
                            tiny_tokenizer, max_prompt_length=4096)
    assert len(dataset) == 8792
    item = dataset[7473]
    assert item["ground_truth"] == "18" and item["data_source"] == "openai/gsm8k" and item["index"] == 7473
    assert tiny_tokenizer.decode(item["input_ids"]).startswith("<|im_start|>user\nJanet")


def write_input(folder, train_lines, test_lines=('{"question": "q", "answer": "#### 1"}',)):
    folder.mkdir()
    for split, lines in (("train", train_lines), ("test", test_lines)):
        if lines is not None:
            (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


GOOD = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}'


@pytest.mark.parametrize("train_lines, test_lines, where, problem", [
    ([GOOD, '{"question": "q"}'], [GOOD], "train.jsonl: row 1: key 'answer'", "answer is missing"),
    ([GOOD, '{"question": 3, "answer": "#### 3"}'], [GOOD], "train.jsonl: row 1: key 'question'",
     "question is int 3"),
    ([GOOD, GOOD, '{"question": "q", "answer": "no final answer"}'], [GOOD], "train.jsonl: row 2: key 'answer'",
     'the answer does not end with "#### <number>"'),
    ([GOOD, "", "{broken"], [GOOD], "train.jsonl: row 1 (line 3)", "not valid JSON"),
    ([GOOD, "[1, 2]"], [GOOD], "train.jsonl: row 1: key 'question'", "question is missing"),
    ([], [GOOD], "train.jsonl", "the file has no rows"),
    ([GOOD], None, "test.jsonl", "no such file"),
])
def test_bad_input_names_file_row_and_key(tmp_path, train_lines, test_lines, where, problem):
    script = load_script()
    folder = write_input(tmp_path / "in", train_lines, test_lines)
    with pytest.raises(DataError) as error:
        script.main(["--local_save_dir", str(tmp_path / "out"), "--input_dir", str(folder)])
    message = str(error.value)
    assert message.startswith(str(folder / where)) and problem in message
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path / "out"))


def test_small_input_end_to_end(tmp_path):
    folder = write_input(tmp_path / "in", [GOOD, '{"question": "Big?", "answer": "#### 1,234,567"}'], [GOOD])
    assert load_script().main(["--local_save_dir", str(tmp_path / "out"), "--input_dir", str(folder)]) == {
        "train": 2, "test": 1}
    records = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in records] == ["2", "1234567"]
