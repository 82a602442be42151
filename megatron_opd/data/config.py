"""`DataConfig`: the `data.*` keys, with their defaults and checks (YAML only overrides them)."""
from dataclasses import dataclass
from typing import Any, Optional

TRUNCATION_MODES = ("error", "left", "right")
# Files are a path or a list of paths. Typed Any: OmegaConf (Hydra's structured configs) has no Union.


class DataConfigError(ValueError):
    """A `data.*` value that cannot work; the message names the key."""


def _file_list(key: str, value) -> list:
    """A path or a sequence of paths (a list, tuple or OmegaConf ListConfig) as a list of str."""
    files = [value] if isinstance(value, str) else value
    try:
        files = list(files)
    except TypeError:
        raise DataConfigError(f"data.{key}={value!r}: must be a path or a list of paths") from None
    if not files or not all(isinstance(f, str) and f for f in files):
        raise DataConfigError(f"data.{key}={value!r}: must be a non-empty path or a non-empty list of paths")
    return files


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    train_files: Optional[Any] = None  # required by training (checked there), not by generation
    val_files: Optional[Any] = None
    train_batch_size: int = 8
    max_prompt_length: int = 512
    truncation: str = "error"
    filter_overlong_prompts: bool = False
    shuffle: bool = True
    seed: int = 0
    prompt_key: str = "prompt"
    response_key: Optional[str] = None  # dotted path of the target response for SFT, e.g. extra_info.answer
    # dotted path of [start, end) character spans of that response trained without loss (e.g. the detours of
    # a walk the model should learn to recover from but never take); needs response_key
    response_skip_key: Optional[str] = None

    def __post_init__(self):
        if self.train_files is not None:
            self.train_files = _file_list("train_files", self.train_files)
        if self.val_files is not None:
            self.val_files = _file_list("val_files", self.val_files)
        for key in ("train_batch_size", "max_prompt_length"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise DataConfigError(f"data.{key}={value!r}: must be an integer >= 1")
        if self.truncation not in TRUNCATION_MODES:
            raise DataConfigError(f"data.truncation={self.truncation!r}: must be one of {'|'.join(TRUNCATION_MODES)}")
        for key in ("filter_overlong_prompts", "shuffle"):
            if not isinstance(getattr(self, key), bool):
                raise DataConfigError(f"data.{key}={getattr(self, key)!r}: must be true or false")
        if not _is_int(self.seed) or self.seed < 0:
            raise DataConfigError(f"data.seed={self.seed!r}: must be an integer >= 0")
        if self.response_skip_key is not None and not self.response_key:
            raise DataConfigError(f"data.response_skip_key={self.response_skip_key!r}: needs data.response_key "
                                  f"(the response its spans index into)")
        if not isinstance(self.prompt_key, str) or not self.prompt_key:
            raise DataConfigError(f"data.prompt_key={self.prompt_key!r}: must be a non-empty column name")
