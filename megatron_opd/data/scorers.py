"""Which scorer grades a response: its row's data_source, and the task reward `reward.fn` names.

A package scores the rows of its own data sources by naming a function `fn(response, ground_truth) -> float`
as an entry point of the group `megatron_opd.scorers`, the data_source as its name (this project's demo does
so for its walk-to-goal task, in setup.py); every other source is scored like GSM8K (the answer after "####").

reward.fn: none | gsm8k | data_source (the row's scorer) | `module:function`, a function called as
fn(data_source, solution_str, ground_truth) -> float (the leading arguments of verl's custom reward)."""
import functools
import importlib
from importlib.metadata import entry_points
from typing import Callable, Sequence

from megatron_opd.data.gsm8k_score import score as gsm8k_score

SCORER_GROUP = "megatron_opd.scorers"


@functools.cache
def _registered_scorer(data_source: str):
    """The scorer registered for `data_source`, or None: imported once, when a row of that source is first scored."""
    entry = next(iter(entry_points(group=SCORER_GROUP, name=data_source)), None)
    return entry.load() if entry is not None else None


def score_response(data_source: str, response: str, ground_truth: str, method: str = "strict") -> float:
    """1.0 for a correct response, else 0.0 (or the registered scorer's value); `method` is the GSM8K
    extraction (strict | flexible)."""
    scorer = _registered_scorer(data_source)
    if scorer is not None:
        return float(scorer(response, ground_truth))
    return gsm8k_score(response, ground_truth, method)


def mean_score(data_sources: Sequence[str], responses: Sequence[str], ground_truths: Sequence[str],
               method: str = "strict") -> float:
    if not responses:
        raise ValueError("mean_score needs at least one response")
    return sum(map(lambda *row: score_response(*row, method), data_sources, responses, ground_truths)) / len(responses)


REWARD_FNS = {"gsm8k": lambda data_source, response, ground_truth: gsm8k_score(response, ground_truth),
              "data_source": score_response}
NO_REWARD = "none"
ENV_REWARD = "env"  # reward.fn: the multi-turn environment's own reward (rollout.env)


def reward_function(name: str) -> Callable[[str, str, str], float]:
    """The function `reward.fn` names: a built-in, or `module:function` imported (ValueError saying why not)."""
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"must be {NO_REWARD}, {' or '.join(REWARD_FNS)}, or module:function")
    try:
        fn = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {attribute} from {module} ({err}); the module must be importable "
                         f"from where the trainer runs") from None
    if not callable(fn):
        raise ValueError(f"{module}.{attribute} is not a function")
    return fn
