"""Prompt data: verl-schema parquet/jsonl prompt datasets with chat templates and overlong handling, a
resumable sampler, the GSM8K scorer and embedded synthetic tasks (arithmetic here; walk-to-goal in
`data/walk.py`). No torch.distributed here."""
from megatron_opd.data.config import TRUNCATION_MODES, DataConfig, DataConfigError
from megatron_opd.data.gsm8k_score import accuracy, extract_answer, normalize_number, score
from megatron_opd.data.prompt_dataset import PromptDataset, collate_prompts
from megatron_opd.data.sampler import PromptSampler
from megatron_opd.data.schema import ROW_SCHEMA, DataError, make_row, write_rows
from megatron_opd.data.synthetic import (
    SYNTHETIC_DATA_SOURCE, arithmetic_problem, questions, synthetic_rows, write_synthetic_parquet)

__all__ = [
    "DataConfig", "DataConfigError", "DataError", "PromptDataset", "PromptSampler", "ROW_SCHEMA",
    "SYNTHETIC_DATA_SOURCE", "TRUNCATION_MODES", "accuracy", "arithmetic_problem", "collate_prompts",
    "extract_answer", "make_row", "normalize_number", "questions", "score", "synthetic_rows", "write_rows",
    "write_synthetic_parquet",
]
