"""Row-addressable readers of one prompt file (parquet or jsonl) that read nothing per row up front.

Parquet: the schema is checked from the footer, then only the columns the dataset needs are decoded into
Arrow buffers (columnar bytes, no Python objects); a row becomes Python only when asked for.
JSONL: one pass finds the line boundaries (a numpy scan, block by block); a line is parsed only
when its row is asked for. The first row is parsed at open so a wrong schema fails at start-up.
"""
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_opd.data.schema import DataError, check_arrow_schema, check_row

SUPPORTED_SUFFIXES = (".parquet", ".jsonl")


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(path, "no such file", fix="check data.train_files / data.val_files")
    if not os.path.isfile(path):
        raise DataError(path, "not a regular file", fix="list the data files themselves, not a directory")
    try:  # opened, not os.access: that asks about the real user, and root passes it whatever the mode
        with open(path, "rb"):
            pass
    except PermissionError:
        raise DataError(path, "permission denied", fix="make the file readable by this user") from None
    if os.path.getsize(path) == 0:
        raise DataError(path, "the file is empty (0 bytes)", fix="rerun the preprocessing that wrote it")


class ParquetSource:
    def __init__(self, path: str, prompt_key: str, response_key: Optional[str] = None,
                 response_skip_key: Optional[str] = None):
        self.path, self.prompt_key = path, prompt_key
        self.keys = {"response_key": response_key, "response_skip_key": response_skip_key}
        _check_readable(path)
        try:
            parquet = pq.ParquetFile(path, memory_map=True)
        except (pa.ArrowException, OSError) as error:
            raise DataError(path, f"not a readable parquet file ({type(error).__name__}: {error})",
                            fix="check that the file was written completely as parquet") from None
        check_arrow_schema(parquet.schema_arrow, path, prompt_key)
        if parquet.metadata.num_rows == 0:
            raise DataError(path, "the file has no rows", fix="rerun the preprocessing that wrote it")
        self._columns = (prompt_key, "data_source", "reward_model")
        for name, key in self.keys.items():
            if key and key.split(".")[0] not in parquet.schema_arrow.names:
                raise DataError(path, f"no column {key.split('.')[0]!r}", key=key, fix=f"check data.{name}")
            if key and key.split(".")[0] not in self._columns:
                self._columns += (key.split(".")[0],)
        self._table = parquet.read(columns=list(self._columns))

    def __len__(self) -> int:
        return self._table.num_rows

    def row(self, index: int) -> dict:
        record = {key: self._table.column(key)[index].as_py() for key in self._columns}
        return check_row(record, self.path, index, self.prompt_key, **self.keys)

    def data_sources(self) -> list:
        """Every row's data_source, from the column alone."""
        return self._table.column("data_source").to_pylist()

    def rows(self, start: int, stop: int) -> list:
        """Rows start..stop-1, converted column-wise (many times faster than row by row)."""
        records = self._table.slice(start, stop - start).to_pylist()
        return [check_row(record, self.path, start + i, self.prompt_key, **self.keys)
                for i, record in enumerate(records)]


def _newline_offsets(path: str, block_bytes: int = 1 << 22):
    """Byte offsets of every newline and the file size, scanning in blocks so memory stays small."""
    found, size = [], 0
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            found.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n")) + size)
            size += len(block)
    return np.concatenate(found), size


class JsonlSource:
    def __init__(self, path: str, prompt_key: str, response_key: Optional[str] = None,
                 response_skip_key: Optional[str] = None):
        self.path, self.prompt_key = path, prompt_key
        self.keys = {"response_key": response_key, "response_skip_key": response_skip_key}
        _check_readable(path)
        try:
            newlines, size = _newline_offsets(path)
        except OSError as error:
            raise DataError(path, f"cannot read ({error})", fix="make the file readable") from None
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        non_blank = ends > starts
        self._starts, self._ends = starts[non_blank], ends[non_blank]
        self._lines = np.flatnonzero(non_blank) + 1
        if len(self._starts) == 0:
            raise DataError(path, "the file has no rows", fix="rerun the preprocessing that wrote it")
        self.row(0)

    def __len__(self) -> int:
        return len(self._starts)

    def row(self, index: int) -> dict:
        line = int(self._lines[index])
        with open(self.path, "rb") as f:
            f.seek(int(self._starts[index]))
            text = f.read(int(self._ends[index] - self._starts[index]))
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(self.path, f"not valid JSON ({error})", row=index, line=line,
                            fix="fix or remove that line") from None
        return check_row(record, self.path, index, self.prompt_key, line=line, **self.keys)

    def rows(self, start: int, stop: int) -> list:
        return [self.row(index) for index in range(start, stop)]

    def data_sources(self) -> list:
        return [record["data_source"] for record in self.rows(0, len(self))]


def open_source(path, prompt_key: str = "prompt", response_key: Optional[str] = None,
                response_skip_key: Optional[str] = None):
    """A ParquetSource or JsonlSource by the file's extension."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return ParquetSource(path, prompt_key, response_key, response_skip_key)
    if suffix == ".jsonl":
        return JsonlSource(path, prompt_key, response_key, response_skip_key)
    raise DataError(path, f"unsupported file extension {suffix!r}",
                    fix=f"use one of {', '.join(SUPPORTED_SUFFIXES)} (convert other formats with pyarrow/pandas)")
