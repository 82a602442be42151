import copy

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.data.schema import ROW_SCHEMA, DataError, check_arrow_schema, check_row, make_row, write_rows


def row(index=0, question="What is 1 + 2?", truth="3"):
    return make_row(data_source="test", question=question, instruction='Answer after "####".', ground_truth=truth,
                    split="train", index=index, answer=f"1 + 2 = 3\n#### {truth}")


def test_make_row_is_verls_schema():
    assert row() == {
        "data_source": "test",
        "prompt": [{"role": "user", "content": 'What is 1 + 2? Answer after "####".'}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "3"},
        "extra_info": {"split": "train", "index": 0, "question": "What is 1 + 2?", "answer": "1 + 2 = 3\n#### 3"},
    }


@pytest.mark.parametrize("num_rows, chunk_rows", [(5, 2), (4, 2), (3, 8), (0, 8)])
def test_write_rows_in_chunks_keeps_order(tmp_path, num_rows, chunk_rows):
    rows = [row(i, truth=str(i)) for i in range(num_rows)]
    assert write_rows(tmp_path / "x.parquet", iter(rows), chunk_rows=chunk_rows) == num_rows
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema == ROW_SCHEMA
    assert table.to_pylist() == rows


def test_check_row_returns_what_the_dataset_needs():
    assert check_row(row(), "f.parquet", 0, "prompt") == {
        "raw_prompt": row()["prompt"], "ground_truth": "3", "data_source": "test"}
    renamed = row()
    renamed["messages"] = renamed.pop("prompt")
    assert check_row(renamed, "f.parquet", 0, "messages")["raw_prompt"] == row()["prompt"]


def _without(key):
    def edit(record):
        del record[key]
    return edit


def _set(path, value):
    def edit(record):
        target = record
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, key, problem", [
    (_without("prompt"), "prompt", "missing key"),
    (_without("data_source"), "data_source", "missing key"),
    (_without("reward_model"), "reward_model", "missing key"),
    (_set(["prompt"], "What is 1 + 2?"), "prompt", "prompt is str 'What is 1 + 2?', expected a non-empty list"),
    (_set(["prompt"], []), "prompt", "expected a non-empty list of messages"),
    (_set(["prompt"], None), "prompt", "prompt is missing"),
    (_set(["prompt", 0], "hello"), "prompt[0]", "message is str 'hello', expected an object"),
    (_set(["prompt", 0, "content"], 5), "prompt[0].content", "content is int 5, expected a string"),
    (_set(["prompt", 0, "content"], None), "prompt[0].content", "content is missing, expected a string"),
    (_set(["prompt", 0, "role"], ["user"]), "prompt[0].role", "role is list ['user'], expected a string"),
    (_set(["data_source"], 1), "data_source", "data_source is int 1, expected a string"),
    (_set(["reward_model"], "3"), "reward_model.ground_truth", "ground truth is missing"),
    (_set(["reward_model", "ground_truth"], 3), "reward_model.ground_truth", "ground truth is int 3"),
])
def test_check_row_errors_name_file_row_and_key(edit, key, problem):
    record = copy.deepcopy(row())
    edit(record)
    with pytest.raises(DataError) as error:
        check_row(record, "data/train.jsonl", 41, "prompt", line=43)
    assert (error.value.path, error.value.row, error.value.key) == ("data/train.jsonl", 41, key)
    message = str(error.value)
    assert message.startswith(f"data/train.jsonl: row 41 (line 43): key {key!r}: ")
    assert problem in message and "; " in message  # what to do follows the problem


def test_check_row_rejects_a_non_object_row():
    with pytest.raises(DataError, match=r"f.jsonl: row 2: row is a list, expected an object"):
        check_row([1, 2], "f.jsonl", 2, "prompt")


def _schema(**types):
    fields = dict(zip(ROW_SCHEMA.names, ROW_SCHEMA.types))
    fields.update(types)
    return pa.schema([(name, t) for name, t in fields.items() if t is not None])


@pytest.mark.parametrize("schema, key, problem", [
    (_schema(prompt=None), "prompt", "missing column"),
    (_schema(reward_model=None), "reward_model", "missing column"),
    (_schema(data_source=None), "data_source", "missing column"),
    (_schema(prompt=pa.string()), "prompt", "column has type string, expected list<struct<role: string"),
    (_schema(prompt=pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())]))), "prompt",
     "column has type list<item: struct<role: string, content: int64>>"),
    (_schema(prompt=pa.list_(pa.string())), "prompt", "column has type list<item: string>"),
    (_schema(data_source=pa.int32()), "data_source", "column has type int32, expected string"),
    (_schema(reward_model=pa.struct([("style", pa.string())])), "reward_model.ground_truth",
     "expected struct<ground_truth: string"),
    (_schema(reward_model=pa.struct([("ground_truth", pa.list_(pa.string()))])), "reward_model.ground_truth",
     "expected struct<ground_truth: string"),
])
def test_arrow_schema_errors_name_file_and_key(schema, key, problem):
    with pytest.raises(DataError) as error:
        check_arrow_schema(schema, "train.parquet", "prompt")
    assert (error.value.path, error.value.row, error.value.key) == ("train.parquet", None, key)
    assert str(error.value).startswith(f"train.parquet: key {key!r}: ") and problem in str(error.value)


def test_arrow_schema_accepts_verls_files_and_large_types():
    check_arrow_schema(ROW_SCHEMA, "train.parquet", "prompt")
    large = pa.large_list(pa.struct([("content", pa.large_string()), ("role", pa.large_string())]))
    check_arrow_schema(_schema(prompt=large, data_source=pa.large_string(), extra_info=None, ability=None),
                       "train.parquet", "prompt")
