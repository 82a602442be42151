import ast
import operator
import random
import re

import pyarrow.parquet as pq
import pytest

from megatron_opd.data import ROW_SCHEMA, PromptDataset, accuracy
from megatron_opd.demo.arithmetic import (
    SYNTHETIC_DATA_SOURCE, arithmetic_problem, questions, synthetic_rows, write_synthetic_parquet)

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression):
    """Python's own precedence, on + - * of integers only."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value
    return walk(ast.parse(expression, mode="eval").body)


def test_difficulty_one_is_a_short_sum():
    question, answer, truth = arithmetic_problem(random.Random(0), difficulty=1)
    a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
    assert 1 <= int(a) <= 20 and 1 <= int(b) <= 20
    assert answer == f"{a} {op} {b} = {truth}\n#### {truth}"
    row = next(synthetic_rows(1))
    assert re.fullmatch(r'What is \d+ [+-] \d+\? Give the final answer after "####"\.',
                        row["prompt"][0]["content"])


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_problems_are_right_and_scale_with_difficulty(difficulty):
    rows = list(synthetic_rows(300, difficulty=difficulty, seed=4))
    multiplied = 0
    for index, row in enumerate(rows):
        info, truth = row["extra_info"], row["reward_model"]["ground_truth"]
        expression = re.fullmatch(r"What is (.+)\?", info["question"]).group(1)
        assert evaluate(expression) == int(truth) >= 0
        assert len(re.findall(r" [-+*] ", expression)) >= difficulty
        assert len(re.findall(r" [-+] ", expression)) == difficulty
        assert all(int(n) <= 10 * (difficulty + 1) for n in re.findall(r"\d+", expression))
        assert info["answer"].endswith(f"\n#### {truth}") and (info["split"], info["index"]) == ("train", index)
        assert row["data_source"] == SYNTHETIC_DATA_SOURCE and row["ability"] == "math"
        multiplied += "*" in expression
    assert (multiplied > 0) == (difficulty >= 3)
    assert accuracy([r["extra_info"]["answer"] for r in rows], [r["reward_model"]["ground_truth"] for r in rows]) == 1.0


def test_deterministic_from_the_seed():
    assert list(synthetic_rows(50, 2, seed=1)) == list(synthetic_rows(50, 2, seed=1))
    assert list(synthetic_rows(50, 2, seed=1)) != list(synthetic_rows(50, 2, seed=2))
    assert list(synthetic_rows(50, 2, seed=1, split="test")) != list(synthetic_rows(50, 2, seed=1))


@pytest.mark.parametrize("difficulty", [0, -1, 1.5, "1"])
def test_bad_difficulty(difficulty):
    with pytest.raises(ValueError, match="difficulty=.*must be an integer >= 1"):
        arithmetic_problem(random.Random(0), difficulty)


def test_parquet_loads_and_scores(tmp_path, tiny_tokenizer):
    path = write_synthetic_parquet(tmp_path / "train.parquet", 40, difficulty=2, seed=5)
    table = pq.read_table(path)
    assert table.schema == ROW_SCHEMA and table.num_rows == 40
    assert table.to_pylist() == list(synthetic_rows(40, difficulty=2, seed=5))
    dataset = PromptDataset(path, tiny_tokenizer, max_prompt_length=256)
    items = [dataset[i] for i in range(40)]
    assert {item["data_source"] for item in items} == {SYNTHETIC_DATA_SOURCE}
    for item in items:
        expression = re.match(r"What is (.+)\?", item["raw_prompt"][0]["content"]).group(1)
        assert item["ground_truth"] == str(evaluate(expression))


def test_largest_bounds_the_operands():
    rows = list(synthetic_rows(200, difficulty=2, seed=3, largest=5))
    numbers = [int(n) for r in rows for n in re.findall(r"\d+", r["extra_info"]["question"])]
    assert max(numbers) == 5 and min(numbers) >= 1


def test_excluded_questions_are_held_out():
    test = list(synthetic_rows(100, difficulty=2, seed=0, split="test", largest=10))
    held_out = questions(test)
    train = list(synthetic_rows(3000, difficulty=2, seed=0, exclude=held_out, largest=10))
    assert len(train) == 3000 and [r["extra_info"]["index"] for r in train] == list(range(3000))
    assert not held_out & questions(train)
    unfiltered = questions(synthetic_rows(3000, difficulty=2, seed=0, largest=10))
    assert held_out & unfiltered  # the space is small enough that, unfiltered, test questions recur


def test_excluding_the_whole_space_fails_with_a_message():
    space = questions(synthetic_rows(2000, difficulty=1, seed=0, largest=2))
    with pytest.raises(ValueError, match="excluding .* leaves too few problems"):
        list(synthetic_rows(5, difficulty=1, seed=1, exclude=space, largest=2))
