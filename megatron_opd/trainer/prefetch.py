"""Bounded staleness (rollout.max_staleness = k > 0): the engine draws step s's samples from the weights of step
max(0, s - k), in a thread of rank 0, while the trainer updates.

The schedule is fixed, whatever the timing: after the weights of step t reach the engine, step t + k's prompts
are drawn and its generation starts; the trainer then trains step t on samples drawn k steps ago (fewer at the
start, where every step up to k draws from the first weights). So a sample's lag is min(s, k) updates, and a
run gives the same numbers however long each side takes. The engine changes weights only when idle: before a
weight push the trainer waits for the generations in flight (with one engine, k = 1 already overlaps all it
can: a step's update with the next step's generation).

A checkpoint holds the steps drawn ahead, their samples made (it waits for them): the resumed run trains on
them as the uninterrupted run would, since the weights they were drawn with are gone.
"""
import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from megatron_opd.config import ConfigError
from megatron_opd.rollout.engine import RolloutError
from megatron_opd.trainer.rollouts import StepSamples, generate, step_samples


@dataclass
class Ahead:
    step: int
    items: list  # its prompts, on every rank
    generated: Any  # rank 0: the Future of what `generate` makes of them, or that result; None elsewhere


class RolloutPrefetch:
    def __init__(self, run, cfg):
        self.run, self.cfg, self.k = run, cfg, cfg.rollout.max_staleness
        self.ahead: deque[Ahead] = deque()
        self.rank0 = run.dims.rank == 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if self.rank0 else None

    def start(self, step: int, saved: str = None) -> None:
        """Collective, with the engine at the weights of `step`: the steps drawn ahead from a checkpoint (`saved`,
        what `state` wrote), else step..step + k drawn and launched now."""
        if saved is not None:
            state = json.loads(saved)
            if state["max_staleness"] != self.k:
                raise ConfigError(f"rollout.max_staleness={self.k}: the checkpoint drew its samples ahead with "
                                  f"rollout.max_staleness={state['max_staleness']}; resume with that value")
            for entry in state["ahead"]:
                made = entry["generated"]
                if isinstance(made, dict):  # a step whose generation failed fails at its turn, on every rank
                    made = RolloutError(made["rollout_error"])
                self.ahead.append(Ahead(entry["step"], entry["items"], made if self.rank0 else None))
            return
        for s in range(step, min(step + self.k + 1, self.cfg.trainer.total_steps)):
            self.launch(s)

    def launch(self, step: int) -> None:
        """Collective: step `step`'s prompts drawn now, its samples made in the background from the engine's
        weights."""
        if step >= self.cfg.trainer.total_steps:
            return
        items = self.run.next_items()
        future = self.pool.submit(_timed, self.run, self.cfg, step, items) if self.rank0 else None
        self.ahead.append(Ahead(step, items, future))

    def samples(self, step: int) -> StepSamples:
        """Collective: step `step`'s samples, waited for."""
        entry = self.ahead.popleft()
        if entry.step != step:
            raise RuntimeError(f"rollout.max_staleness: step {step} found the samples of step {entry.step} next")
        return step_samples(self.run, self.cfg, step, entry.items, self._made(entry))

    def wait(self) -> None:
        """Rank 0: every generation in flight finished (the engine idle, its weights free to change)."""
        for entry in self.ahead:
            self._made(entry)

    def state(self) -> str:
        """The steps drawn ahead, their samples made, for a checkpoint (JSON: exact for floats, any item values)."""
        self.wait()
        return json.dumps({"max_staleness": self.k, "ahead": [
            {"step": e.step, "items": e.items, "generated": self._made(e) if self.rank0 else None} for e in self.ahead]},
            default=_plain)

    def _made(self, entry: Ahead):
        if isinstance(entry.generated, Future):
            entry.generated = entry.generated.result()
        return entry.generated

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _timed(run, cfg, step: int, items: list):
    """`generate`, its seconds in its metrics (timing_s/generate: the engine's busy time for the step)."""
    started = time.perf_counter()
    generated = generate(run, cfg, step, items)
    if not isinstance(generated, RolloutError):
        generated[4]["timing_s/generate"] = time.perf_counter() - started
    return generated


def _plain(value):
    """numpy values of a parquet row as JSON writes them; a step's RolloutError as its message."""
    if isinstance(value, RolloutError):
        return {"rollout_error": str(value)}
    return value.tolist() if hasattr(value, "tolist") else str(value)
