"""`PromptDataset`: prompts from one or many parquet/jsonl files in verl's schema, chat-templated and
tokenised when an item is read, with overlong prompts handled per `data.truncation` /
`data.filter_overlong_prompts`.

Opening reads the file footers / line boundaries and the needed Arrow columns only; nothing is tokenised
up front. The exception is `filter_overlong_prompts=True`: which prompts survive depends on their token
counts, and the sampler needs the surviving count before the first batch, so construction tokenises every
prompt once (in chunks, through the fast tokenizer's batch path) and keeps only the surviving row ids. That
costs one pass over the data (bench/data_load.py measures it); it is what verl does too.
"""
import operator
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron_opd.data.chat import encode_prompt, prompt_lengths, render_prompts
from megatron_opd.data.config import TRUNCATION_MODES, DataConfig, DataConfigError
from megatron_opd.data.schema import DataError
from megatron_opd.data.sources import open_source

FILTER_CHUNK_ROWS = 4096
OVERLONG_FIX = ("raise data.max_prompt_length, set data.truncation=left|right, "
                "or set data.filter_overlong_prompts=true")


class PromptDataset:
    """item = {"input_ids": list[int] (templated prompt incl. the generation prompt), "raw_prompt": messages,
    "ground_truth": str, "data_source": str, "index": int}, plus "response": str when `response_key` is set
    (SFT targets). `index` is the row's position in the files
    concatenated in order, counted before filtering, so it names the same prompt whatever the filter does."""

    def __init__(self, files: Union[str, os.PathLike, Sequence], tokenizer, *, max_prompt_length: int,
                 truncation: str = "error", filter_overlong_prompts: bool = False, prompt_key: str = "prompt",
                 response_key: Optional[str] = None):
        if truncation not in TRUNCATION_MODES:
            raise DataConfigError(f"data.truncation={truncation!r}: must be one of {'|'.join(TRUNCATION_MODES)}")
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        self.tokenizer, self.max_prompt_length, self.truncation = tokenizer, max_prompt_length, truncation
        self.prompt_key = prompt_key
        self.sources = [open_source(path, prompt_key, response_key) for path in files]
        self._starts = np.cumsum([0] + [len(source) for source in self.sources])
        self.num_rows = int(self._starts[-1])
        self._kept_rows: Optional[np.ndarray] = None
        if filter_overlong_prompts:
            self._kept_rows = self._rows_within_length()
            if len(self._kept_rows) == 0:
                raise DataError(", ".join(str(f) for f in files), f"all {self.num_rows} prompts are longer than "
                                f"data.max_prompt_length={max_prompt_length} tokens", key=prompt_key,
                                fix="raise data.max_prompt_length")

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, split: str = "train") -> "PromptDataset":
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: must be 'train' or 'val'")
        key = f"{split}_files"
        files = getattr(config, key)
        if files is None:
            raise DataConfigError(f"data.{key} is not set; list the {split} files there")
        return cls(files, tokenizer, max_prompt_length=config.max_prompt_length, truncation=config.truncation,
                   filter_overlong_prompts=config.filter_overlong_prompts, prompt_key=config.prompt_key,
                   response_key=config.response_key if split == "train" else None)

    @property
    def num_filtered(self) -> int:
        return self.num_rows - len(self)

    def __len__(self) -> int:
        return self.num_rows if self._kept_rows is None else len(self._kept_rows)

    def _locate(self, row: int):
        file_index = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.sources[file_index], row - int(self._starts[file_index])

    def _rows_within_length(self) -> np.ndarray:
        lengths = []
        for source in self.sources:
            for start in range(0, len(source), FILTER_CHUNK_ROWS):
                records = source.rows(start, min(start + FILTER_CHUNK_ROWS, len(source)))
                texts = render_prompts(self.tokenizer, [record["raw_prompt"] for record in records])
                lengths.extend(prompt_lengths(self.tokenizer, texts))
        return np.flatnonzero(np.asarray(lengths) <= self.max_prompt_length)

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} prompts")
        index %= len(self)
        row = index if self._kept_rows is None else int(self._kept_rows[index])
        source, local_row = self._locate(row)
        record = source.row(local_row)
        input_ids = encode_prompt(self.tokenizer, record["raw_prompt"])
        if len(input_ids) > self.max_prompt_length:
            if self.truncation == "error":
                raise DataError(source.path, f"prompt has {len(input_ids)} tokens, more than "
                                f"data.max_prompt_length={self.max_prompt_length}", row=local_row,
                                key=self.prompt_key, fix=OVERLONG_FIX)
            # left keeps the end of the prompt, where the question and the generation prompt are.
            input_ids = (input_ids[-self.max_prompt_length:] if self.truncation == "left"
                         else input_ids[:self.max_prompt_length])
        item = {"input_ids": input_ids, "raw_prompt": record["raw_prompt"], "ground_truth": record["ground_truth"],
                "data_source": record["data_source"], "index": row}
        if "response" in record:
            item["response"] = record["response"]
        return item


def collate_prompts(items: Sequence[dict], pad_token_id: int) -> dict:
    """A batch: `input_ids` [b, s] left-padded (prompts end where generation starts) with `attention_mask`,
    `prompt_ids` the unpadded lists (what an engine takes), the other fields as lists, `index` as a tensor."""
    if not items:
        raise ValueError("collate_prompts needs at least one item")
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[i, width - n:] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[i, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "prompt_ids": [item["input_ids"] for item in items],
            "raw_prompt": [item["raw_prompt"] for item in items],
            "ground_truth": [item["ground_truth"] for item in items],
            "data_source": [item["data_source"] for item in items],
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
