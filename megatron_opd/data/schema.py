"""verl's prompt-data schema: the columns a row carries, checks on a file's column types and on one row,
and the parquet writer that the GSM8K preprocessing and the synthetic task share.

A row (one prompt):
    data_source   str                       which scorer applies ("openai/gsm8k", "synthetic_arithmetic")
    prompt        [{"role", "content"}]     chat messages (the column name is `data.prompt_key`)
    ability       str                       e.g. "math"
    reward_model  {"style", "ground_truth"} the answer the scorer compares against
    extra_info    {"split", "index", "question", "answer"}
Reading needs only data_source, the prompt and reward_model.ground_truth, so files written by other verl
preprocessors (other extra_info fields, other abilities) load unchanged.
"""
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

ROW_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("question", pa.string()),
                              ("answer", pa.string())])),
])
MESSAGES_HINT = 'write it as a list of {"role": str, "content": str} messages (verl\'s schema)'
GROUND_TRUTH_HINT = 'write reward_model as {"style": "rule", "ground_truth": "<the answer as a string>"}'


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the key, and says what to do."""

    def __init__(self, path, problem: str, *, row: Optional[int] = None, key: Optional[str] = None,
                 fix: Optional[str] = None, line: Optional[int] = None):
        self.path, self.row, self.key = str(path), row, key
        where = [self.path]
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(": ".join(where) + f": {problem}" + (f"; {fix}" if fix else ""))


def make_row(*, data_source: str, question: str, instruction: str, ground_truth: str, split: str, index: int,
             answer: str, ability: str = "math") -> dict:
    """One row in verl's schema: the user message is the question followed by the instruction."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": f"{question} {instruction}"}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "question": question, "answer": answer},
    }


def write_rows(path, rows: Iterable[dict], chunk_rows: int = 8192) -> int:
    """Write rows (see `make_row`) to a parquet file in chunks, so a large file never sits in memory as
    Python objects; returns the number of rows written."""
    count = 0
    with pq.ParquetWriter(str(path), ROW_SCHEMA) as writer:
        chunk = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == chunk_rows:
                writer.write_table(pa.Table.from_pylist(chunk, schema=ROW_SCHEMA))
                count, chunk = count + len(chunk), []
        if chunk or count == 0:
            writer.write_table(pa.Table.from_pylist(chunk, schema=ROW_SCHEMA))
            count += len(chunk)
    return count


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _struct_field(t: Optional[pa.DataType], name: str) -> Optional[pa.DataType]:
    index = t.get_field_index(name) if t is not None and pa.types.is_struct(t) else -1
    return t.field(index).type if index >= 0 else None


def check_arrow_schema(schema: pa.Schema, path, prompt_key: str) -> None:
    """Column presence and types, from a file's metadata alone (no rows are read)."""
    for key in (prompt_key, "data_source", "reward_model"):
        if schema.get_field_index(key) < 0:
            raise DataError(path, f"missing column (the file has {schema.names})", key=key,
                            fix=_missing_column_fix(key, prompt_key))
    prompt_type = schema.field(prompt_key).type
    is_list = pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type)
    message_type = prompt_type.value_type if is_list else None
    message_fields = [_struct_field(message_type, name) for name in ("role", "content")]
    if not all(t is not None and _is_string(t) for t in message_fields):
        raise DataError(path, f"column has type {prompt_type}, expected list<struct<role: string, content: "
                        f"string>>", key=prompt_key, fix=MESSAGES_HINT)
    source_type = schema.field("data_source").type
    if not _is_string(source_type):
        raise DataError(path, f"column has type {source_type}, expected string", key="data_source",
                        fix="write the data source name as a string")
    reward_type = schema.field("reward_model").type
    truth_type = _struct_field(reward_type, "ground_truth")
    if truth_type is None or not _is_string(truth_type):
        raise DataError(path, f"column has type {reward_type}, expected struct<ground_truth: string, ...>",
                        key="reward_model.ground_truth", fix=GROUND_TRUTH_HINT)


def _missing_column_fix(key: str, prompt_key: str) -> str:
    if key == prompt_key:
        return f"set data.prompt_key to the column holding the chat messages, or {MESSAGES_HINT}"
    return "preprocess the data into verl's schema (see examples/data_preprocess/gsm8k.py)"


def _dotted(record: Any, key: str) -> Any:
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def check_row(record: Any, path, row: int, prompt_key: str, line: Optional[int] = None,
              response_key: Optional[str] = None, response_skip_key: Optional[str] = None) -> dict:
    """Validate one row; return {"raw_prompt", "ground_truth", "data_source"} (+ "response" when
    `response_key`, a dotted path such as extra_info.answer, is given; + "response_skip", the [start, end)
    character spans of the response left out of the loss, when `response_skip_key` is)."""
    def fail(problem: str, key: Optional[str] = None, fix: Optional[str] = None):
        raise DataError(path, problem, row=row, key=key, fix=fix, line=line)

    if not isinstance(record, dict):
        fail(f"row is a {type(record).__name__}, expected an object with verl's columns",
             fix="write one JSON object per line")
    for key in (prompt_key, "data_source", "reward_model"):
        if key not in record:
            fail(f"missing key (the row has {sorted(record)})", key, _missing_column_fix(key, prompt_key))
    messages = record[prompt_key]
    if not isinstance(messages, list) or not messages:
        fail(f"prompt is {_describe(messages)}, expected a non-empty list of messages", prompt_key, MESSAGES_HINT)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            fail(f"message is {_describe(message)}, expected an object", f"{prompt_key}[{i}]", MESSAGES_HINT)
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                fail(f"{field} is {_describe(message.get(field))}, expected a string",
                     f"{prompt_key}[{i}].{field}", MESSAGES_HINT)
    if not isinstance(record["data_source"], str):
        fail(f"data_source is {_describe(record['data_source'])}, expected a string", "data_source",
             "write the data source name as a string")
    reward_model = record["reward_model"]
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if not isinstance(truth, str):
        fail(f"ground truth is {_describe(truth)}, expected a string", "reward_model.ground_truth",
             GROUND_TRUTH_HINT)
    checked = {"raw_prompt": messages, "ground_truth": truth, "data_source": record["data_source"]}
    if response_key:
        response = _dotted(record, response_key)
        if not isinstance(response, str):
            fail(f"response is {_describe(response)}, expected a string", response_key,
                 "set data.response_key to the dotted path of the response text (e.g. extra_info.answer)")
        checked["response"] = response
    if response_skip_key:
        spans = _dotted(record, response_skip_key)
        if not isinstance(spans, list) or not all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(i, int) for i in s)
                and 0 <= s[0] < s[1] <= len(checked["response"]) for s in spans):
            fail(f"spans are {_describe(spans)}, expected a list of [start, end) character offsets into the "
                 f"response ({len(checked['response'])} characters)", response_skip_key,
                 "write [[start, end], ...] with 0 <= start < end <= len(response), or [] for none")
        checked["response_skip"] = [tuple(s) for s in spans]
    return checked


def _describe(value: Any) -> str:
    return "missing" if value is None else f"{type(value).__name__} {value!r:.60}"
