"""Prompt data: verl-schema parquet/jsonl prompt datasets with chat templates and overlong handling, a
resumable sampler, the GSM8K scorer and the scorers by data source. No torch.distributed here."""
from megatron_opd.data.config import TRUNCATION_MODES, DataConfig, DataConfigError
from megatron_opd.data.gsm8k_score import accuracy, extract_answer, normalize_number, score
from megatron_opd.data.prompt_dataset import PromptDataset, collate_prompts
from megatron_opd.data.sampler import PromptSampler
from megatron_opd.data.schema import ROW_SCHEMA, DataError, make_row, write_rows

__all__ = [
    "DataConfig", "DataConfigError", "DataError", "PromptDataset", "PromptSampler", "ROW_SCHEMA",
    "TRUNCATION_MODES", "accuracy", "collate_prompts", "extract_answer", "make_row", "normalize_number", "score",
    "write_rows",
]
