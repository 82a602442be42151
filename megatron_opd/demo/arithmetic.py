"""An embedded arithmetic task for the demo and the tests: no download, learnable by a tiny model, written in
verl's schema with GSM8K's answer format ("#### 19"), so the GSM8K scorer grades it unchanged.

difficulty d: d operations on operands up to 10*(d+1) (or `largest`); "+" and "-" from d=1, "*" by a single
digit from d=3 (the usual precedence applies). Results never go below zero. Difficulty 1 is "What is 12 + 7?".
"""
import random
from typing import Collection, Iterable, Iterator, Optional

from megatron_opd.data.schema import make_row, write_rows

SYNTHETIC_DATA_SOURCE = "synthetic_arithmetic"
INSTRUCTION = 'Give the final answer after "####".'
MULTIPLY_FROM_DIFFICULTY = 3


def arithmetic_problem(rng: random.Random, difficulty: int = 1, largest: Optional[int] = None) -> tuple:
    """(question, worked answer ending in "#### N", N as a string); operands up to `largest` (default 10*(d+1))."""
    if not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"difficulty={difficulty!r}: must be an integer >= 1")
    if largest is not None and (not isinstance(largest, int) or largest < 1):
        raise ValueError(f"largest={largest!r}: must be an integer >= 1 (or None for the difficulty's default)")
    largest = largest or 10 * (difficulty + 1)
    total = rng.randint(1, largest)
    expression, steps = str(total), []
    for _ in range(difficulty):
        # A product is one term of the sum, so evaluating the terms left to right respects precedence.
        if difficulty >= MULTIPLY_FROM_DIFFICULTY and rng.random() < 0.3:
            base, factor = rng.randint(1, largest), rng.randint(2, 9)
            term, written = base * factor, f"{base} * {factor}"
            steps.append(f"{written} = {term}")
        else:
            term = written = rng.randint(1, largest)
        sign = "-" if term <= total and rng.random() < 0.5 else "+"
        before, total = total, total - term if sign == "-" else total + term
        expression += f" {sign} {written}"
        steps.append(f"{before} {sign} {term} = {total}")
    question = f"What is {expression}?"
    answer = "\n".join(steps + [f"#### {total}"])
    return question, answer, str(total)


def synthetic_rows(num_rows: int, difficulty: int = 1, seed: int = 0, split: str = "train",
                   exclude: Collection[str] = (), largest: Optional[int] = None) -> Iterator[dict]:
    """Rows in verl's schema, the same for the same arguments. Questions in `exclude` (another split's, so
    that split is held out) are drawn again; their share of the problem space must leave room for the rest."""
    rng = random.Random(f"{seed}-{split}-{difficulty}")
    index, draws = 0, 0
    while index < num_rows:
        question, answer, ground_truth = arithmetic_problem(rng, difficulty, largest)
        draws += 1
        if question in exclude:
            if draws > 100 * num_rows:
                raise ValueError(f"difficulty={difficulty}: excluding {len(exclude)} questions leaves too few "
                                 f"problems to draw {num_rows} rows; exclude fewer or raise the difficulty")
            continue
        yield make_row(data_source=SYNTHETIC_DATA_SOURCE, question=question, instruction=INSTRUCTION,
                       ground_truth=ground_truth, split=split, index=index, answer=answer)
        index += 1


def questions(rows: Iterable[dict]) -> set[str]:
    """The distinct questions of rows made here, to exclude from another split."""
    return {row["extra_info"]["question"] for row in rows}


def write_synthetic_parquet(path, num_rows: int, difficulty: int = 1, seed: int = 0, split: str = "train",
                            exclude: Collection[str] = (), largest: Optional[int] = None) -> str:
    write_rows(path, synthetic_rows(num_rows, difficulty, seed, split, exclude, largest))
    return str(path)
