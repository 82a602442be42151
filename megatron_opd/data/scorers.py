"""Which scorer grades a row: its data_source. The walk-to-goal task scores success (the goal reached within
the slack); every other source is scored like GSM8K (the answer after "####"), the format the arithmetic task
and GSM8K share."""
from typing import Sequence

from megatron_opd.data.gsm8k_score import score as gsm8k_score
from megatron_opd.data.walk import WALK_DATA_SOURCE, parse_ground_truth, walk_outcome


def score_response(data_source: str, response: str, ground_truth: str, method: str = "strict") -> float:
    """1.0 for a correct response, else 0.0; `method` is the GSM8K extraction (strict | flexible)."""
    if data_source == WALK_DATA_SOURCE:
        return float(walk_outcome(*parse_ground_truth(ground_truth), response)["success"])
    return gsm8k_score(response, ground_truth, method)


def mean_score(data_sources: Sequence[str], responses: Sequence[str], ground_truths: Sequence[str],
               method: str = "strict") -> float:
    if not responses:
        raise ValueError("mean_score needs at least one response")
    return sum(map(lambda *row: score_response(*row, method), data_sources, responses, ground_truths)) / len(responses)
