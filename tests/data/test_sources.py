import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.data.schema import ROW_SCHEMA, DataError, make_row, write_rows
from megatron_opd.data import sources
from megatron_opd.data.sources import JsonlSource, ParquetSource, open_source


def rows(n):
    return [make_row(data_source="test", question=f"What is {i} + 1?", instruction="Answer after ####.",
                     ground_truth=str(i + 1), split="train", index=i, answer=f"#### {i + 1}") for i in range(n)]


def write_jsonl(path, records, blank_lines=False):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
            if blank_lines:
                f.write("\n")
    return str(path)


def error_of(path, index=None):
    with pytest.raises(DataError) as error:
        source = open_source(path)
        if index is not None:
            source.row(index)
    return error.value


def test_parquet_and_jsonl_give_the_same_rows(tmp_path):
    write_rows(tmp_path / "a.parquet", rows(5))
    parquet, jsonl = open_source(tmp_path / "a.parquet"), open_source(write_jsonl(tmp_path / "a.jsonl", rows(5)))
    assert isinstance(parquet, ParquetSource) and isinstance(jsonl, JsonlSource)
    assert len(parquet) == len(jsonl) == 5
    expected = [{"raw_prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"], "data_source": "test"}
                for r in rows(5)]
    assert [parquet.row(i) for i in range(5)] == [jsonl.row(i) for i in range(5)] == expected
    assert parquet.rows(1, 4) == jsonl.rows(1, 4) == expected[1:4]


def test_jsonl_skips_blank_lines_and_reports_line_numbers(tmp_path):
    records = rows(3)
    records[2]["prompt"][0]["content"] = 7
    source = open_source(write_jsonl(tmp_path / "b.jsonl", records, blank_lines=True))
    assert len(source) == 3 and source.row(1)["ground_truth"] == "2"
    with pytest.raises(DataError) as error:
        source.row(2)
    assert (error.value.row, error.value.key) == (2, "prompt[0].content")
    assert str(error.value).startswith(f"{tmp_path / 'b.jsonl'}: row 2 (line 5): key 'prompt[0].content': "
                                       f"content is int 7, expected a string")


def test_missing_column(tmp_path):
    table = pa.Table.from_pylist(rows(2), schema=ROW_SCHEMA).drop_columns(["reward_model"])
    pq.write_table(table, tmp_path / "c.parquet")
    error = error_of(tmp_path / "c.parquet")
    assert (error.path, error.key) == (str(tmp_path / "c.parquet"), "reward_model")
    assert "missing column" in str(error)

    records = rows(2)
    del records[0]["data_source"]
    error = error_of(write_jsonl(tmp_path / "c.jsonl", records))  # the first row is checked at open
    assert (error.row, error.key) == (0, "data_source") and "missing key" in str(error)


def test_prompt_key_names_the_column(tmp_path):
    write_rows(tmp_path / "d.parquet", rows(2))
    with pytest.raises(DataError) as error:
        open_source(tmp_path / "d.parquet", prompt_key="messages")
    assert error.value.key == "messages" and "set data.prompt_key" in str(error.value)


@pytest.mark.parametrize("name, content, problem", [
    ("empty.parquet", b"", "the file is empty (0 bytes)"),
    ("empty.jsonl", b"", "the file is empty (0 bytes)"),
    ("blank.jsonl", b"\n\n\n", "the file has no rows"),
])
def test_empty_files(tmp_path, name, content, problem):
    (tmp_path / name).write_bytes(content)
    error = error_of(tmp_path / name)
    assert error.path == str(tmp_path / name) and problem in str(error)


def test_parquet_without_rows(tmp_path):
    write_rows(tmp_path / "none.parquet", [])
    assert "the file has no rows" in str(error_of(tmp_path / "none.parquet"))


def test_malformed_rows(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [rows(1)[0], "{not json", json.dumps(rows(1)[0])[:-1], "[1, 2]"])
    source = open_source(path)
    for index, problem in ((1, "not valid JSON"), (2, "not valid JSON"), (3, "row is a list")):
        with pytest.raises(DataError) as error:
            source.row(index)
        assert (error.value.path, error.value.row) == (path, index) and problem in str(error.value)

    # A parquet file can hold a null message or a message without content although its type is right.
    records = rows(3)
    records[1]["prompt"] = [{"role": "user", "content": None}]
    records[2]["prompt"] = [None]
    pq.write_table(pa.Table.from_pylist(records, schema=ROW_SCHEMA), tmp_path / "e.parquet")
    source = open_source(tmp_path / "e.parquet")
    for index, key in ((1, "prompt[0].content"), (2, "prompt[0]")):
        with pytest.raises(DataError) as error:
            source.row(index)
        assert (error.value.row, error.value.key) == (index, key)
    with pytest.raises(DataError, match="row 1: key 'prompt\\[0\\].content'"):
        source.rows(0, 3)


def test_non_string_prompt(tmp_path):
    records = rows(2)
    records[1]["prompt"] = "What is 1 + 1?"
    error = error_of(write_jsonl(tmp_path / "f.jsonl", records), index=1)
    assert (error.row, error.key) == (1, "prompt") and "expected a non-empty list of messages" in str(error)

    table = pa.table({"data_source": ["t"], "prompt": ["What is 1 + 1?"],
                      "reward_model": [{"style": "rule", "ground_truth": "2"}]})
    pq.write_table(table, tmp_path / "f.parquet")
    error = error_of(tmp_path / "f.parquet")
    assert error.key == "prompt" and "column has type string" in str(error)

    table = pa.table({"data_source": ["t"], "prompt": [[{"role": "user", "content": 5}]],
                      "reward_model": [{"style": "rule", "ground_truth": "2"}]})
    pq.write_table(table, tmp_path / "g.parquet")
    assert "content: int64" in str(error_of(tmp_path / "g.parquet"))


@pytest.mark.parametrize("name, problem", [
    ("missing.parquet", "no such file"),
    ("folder.parquet", "not a regular file"),
    ("junk.parquet", "not a readable parquet file (ArrowInvalid"),
    ("junk.jsonl", "not valid JSON"),
])
def test_unreadable_files(tmp_path, name, problem):
    path = tmp_path / name
    if name.startswith("folder"):
        path.mkdir()
    elif name.startswith("junk"):
        path.write_bytes(b"\xff\xfe not a table\n")
    error = error_of(str(path))
    assert error.path == str(path) and problem in str(error)


@pytest.mark.parametrize("name", ["h.parquet", "h.jsonl"])
def test_permission_denied(tmp_path, monkeypatch, name):
    """As the OS answers a user without read permission; root reads whatever the mode, so open() says so here."""
    write_rows(tmp_path / name, rows(1))

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    error = error_of(str(tmp_path / name))
    assert error.path == str(tmp_path / name) and "permission denied" in str(error)


def test_unsupported_extension(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt\nhi\n")
    error = error_of(str(tmp_path / "rows.csv"))
    assert "unsupported file extension '.csv'" in str(error) and ".parquet, .jsonl" in str(error)
