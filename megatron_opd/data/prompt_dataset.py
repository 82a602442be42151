"""`PromptDataset`: prompts from one or many parquet/jsonl files in verl's schema, chat-templated and
tokenised when an item is read, with overlong prompts handled per `data.truncation` /
`data.filter_overlong_prompts`.

Opening reads the file footers / line boundaries and the needed Arrow columns, then tokenises every prompt
once (in chunks, through the fast tokenizer's batch path) when their lengths matter up front:
`filter_overlong_prompts=True` (which prompts survive decides the sampler's count) and `truncation=error`
(an overlong prompt is an error at start-up, naming its file and row, not hours into a run when its row is
first drawn). That costs one pass over the data (bench/data_load.py measures it); verl filters the same
way. Items are tokenised again when read.
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
    (SFT targets) and "response_skip" (its character spans without loss) when `response_skip_key` is. `index`
    is the row's position in the files concatenated in order, counted before filtering, so it names the same
    prompt whatever the filter does."""

    def __init__(self, files: Union[str, os.PathLike, Sequence], tokenizer, *, max_prompt_length: int,
                 truncation: str = "error", filter_overlong_prompts: bool = False, prompt_key: str = "prompt",
                 response_key: Optional[str] = None, response_skip_key: Optional[str] = None):
        if truncation not in TRUNCATION_MODES:
            raise DataConfigError(f"data.truncation={truncation!r}: must be one of {'|'.join(TRUNCATION_MODES)}")
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        self.tokenizer, self.max_prompt_length, self.truncation = tokenizer, max_prompt_length, truncation
        self.prompt_key = prompt_key
        self.sources = [open_source(path, prompt_key, response_key, response_skip_key) for path in files]
        self._starts = np.cumsum([0] + [len(source) for source in self.sources])
        self.num_rows = int(self._starts[-1])
        self._kept_rows: Optional[np.ndarray] = None
        if filter_overlong_prompts:
            self._kept_rows = np.flatnonzero(self._prompt_lengths() <= max_prompt_length)
            if len(self._kept_rows) == 0:
                raise DataError(", ".join(str(f) for f in files), f"all {self.num_rows} prompts are longer than "
                                f"data.max_prompt_length={max_prompt_length} tokens", key=prompt_key,
                                fix="raise data.max_prompt_length")
        elif truncation == "error":
            overlong = np.flatnonzero(self._prompt_lengths() > max_prompt_length)
            if len(overlong):
                source, local_row = self._locate(int(overlong[0]))
                raise DataError(source.path, f"prompt has more tokens than data.max_prompt_length="
                                f"{max_prompt_length} ({len(overlong)} of the {self.num_rows} prompts do)",
                                row=local_row, key=prompt_key, fix=OVERLONG_FIX)

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
                   response_key=config.response_key if split == "train" else None,
                   response_skip_key=config.response_skip_key if split == "train" else None)

    @property
    def num_filtered(self) -> int:
        return self.num_rows - len(self)

    def __len__(self) -> int:
        return self.num_rows if self._kept_rows is None else len(self._kept_rows)

    def _locate(self, row: int):
        file_index = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.sources[file_index], row - int(self._starts[file_index])

    def _prompt_lengths(self) -> np.ndarray:
        """Token counts of every templated prompt, in row order."""
        lengths = []
        for source in self.sources:
            for start in range(0, len(source), FILTER_CHUNK_ROWS):
                records = source.rows(start, min(start + FILTER_CHUNK_ROWS, len(source)))
                texts = render_prompts(self.tokenizer, [record["raw_prompt"] for record in records])
                lengths.extend(prompt_lengths(self.tokenizer, texts))
        return np.asarray(lengths, dtype=np.int64)

    def first_rows_by_source(self) -> dict:
        """data_source -> (file, row in it) of its first row the dataset serves (read from that column only)."""
        kept = None if self._kept_rows is None else set(self._kept_rows.tolist())
        first = {}
        for source, start in zip(self.sources, self._starts):
            for local_row, name in enumerate(source.data_sources()):
                if name not in first and (kept is None or int(start) + local_row in kept):
                    first[name] = (source.path, local_row)
        return first

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} prompts")
        index %= len(self)
        row = index if self._kept_rows is None else int(self._kept_rows[index])
        source, local_row = self._locate(row)
        record = source.row(local_row)
        input_ids = encode_prompt(self.tokenizer, record["raw_prompt"])
        if len(input_ids) > self.max_prompt_length:  # only under truncation=left|right: opening checked the rest
            # left keeps the end of the prompt, where the question and the generation prompt are.
            input_ids = (input_ids[-self.max_prompt_length:] if self.truncation == "left"
                         else input_ids[:self.max_prompt_length])
        item = {"input_ids": input_ids, "raw_prompt": record["raw_prompt"], "ground_truth": record["ground_truth"],
                "data_source": record["data_source"], "index": row}
        for key in ("response", "response_skip"):
            if key in record:
                item[key] = record[key]
        return item


def collate_prompts(items: Sequence[dict], pad_token_id: int, device: Union[str, torch.device] = "cpu") -> dict:
    """A batch: `input_ids` [b, s] left-padded (prompts end where generation starts) with `attention_mask`,
    `prompt_ids` the unpadded lists (what an engine takes), the other fields as lists, `index` as a tensor;
    tensors on `device`."""
    if not items:
        raise ValueError("collate_prompts needs at least one item")
    width = max(len(item["input_ids"]) for item in items)
    padding = [width - len(item["input_ids"]) for item in items]
    input_ids = torch.tensor([[pad_token_id] * pad + list(item["input_ids"]) for pad, item in zip(padding, items)],
                             dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in padding], dtype=torch.long,
                                  device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "prompt_ids": [item["input_ids"] for item in items],
            "raw_prompt": [item["raw_prompt"] for item in items],
            "ground_truth": [item["ground_truth"] for item in items],
            "data_source": [item["data_source"] for item in items],
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long, device=device)}
