"""The engine interface the trainer talks to: generation of student rollouts, scoring of given sequences
(a teacher served by an engine), weight updates and lifecycle. SGLang and the embedded engine implement
it with the same output fields, so the trainer cannot tell them apart.

Log-probs follow SGLang's convention: the log-probability of the sampled token under the
temperature-scaled distribution (before top-k/top-p filtering).
"""
import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch


class RolloutError(RuntimeError):
    """The engine could not produce what was asked (after retries); the message says why."""


class StaleWeightsError(RolloutError):
    """A response was generated with other weights than the engine's current version."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    n: int = 1  # samples per prompt
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None
    # Ids at or above it are no token (the padding rows of a checkpoint's vocabulary): never sampled, and
    # outside the distribution the log-probs are taken over. None: the model's whole vocabulary.
    vocab_size: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 0 or self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters {self}")


@dataclass
class Sample:
    """One response to one prompt."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # one per response token
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int
    cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache (SGLang's meta_info)


@dataclass
class ScoredSequence:
    """Log-probs of each token of a given sequence given its prefix (position 0 has none)."""
    token_logprobs: list[float]  # len(sequence) - 1
    top_ids: list[list[int]] = field(default_factory=list)  # per scored position, when top_k > 0
    top_logprobs: list[list[float]] = field(default_factory=list)


class RolloutEngine(abc.ABC):
    weight_version: int = 0

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def healthy(self) -> bool: ...

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        """`sampling.n` samples per prompt, grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]."""

    @abc.abstractmethod
    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoredSequence]: ...

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors (a full model, streamed) and call the result `version`."""

    def sleep(self) -> None:
        """Give up the accelerator memory the engine holds, for the trainer's update. The trainer calls it once
        a step's rollouts are generated and scored, before its forward/backward/optimizer step. Nothing to do
        unless the engine shares the trainer's GPUs; anything that needs the memory takes it back."""

    def wake_up(self) -> None:
        """Take the memory back. The trainer calls it after pushing the step's new weights (update_weights,
        which brings back only what loading them needs), before the next generate or score."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
