import json

import pytest

from megatron_opd.data import accuracy, extract_answer, normalize_number, score

# text, strict answer, flexible answer
TRICKY = [
    ("#### 1,000", "1000", "1000"),
    ("#### $18", "18", "18"),
    ("#### 18.0", "18", "18"),
    ("#### 18.", "18", "18"),
    ("So she makes $18 every day.\n#### 18", "18", "18"),
    ("The answer is 5. #### 7", "7", "7"),
    ("#### 7 apples, 3 left over", "7", "3"),
    ("The answer is 42.", None, "42"),
    ("#### -5", "-5", "-5"),
    ("#### -$5", "-5", "-5"),
    ("#### $-5", "-5", "-5"),
    ("####-3", "-3", "-3"),
    ("#### 0.50", "0.5", "0.5"),
    ("#### 1,234.50", "1234.5", "1234.5"),
    ("#### -0", "0", "0"),
    ("#### 72\n#### 73", "73", "73"),
    ("####", None, None),
    ("#### seventy", None, None),
    ("no answer here", None, None),
    ("", None, None),
    ("x = 10 - 3", None, "3"),
    ("ages 3-4", None, "4"),
    ("v2 of the plan gives 9", None, "9"),
    ("a 12.5% raise", None, "12.5"),
    ("costs US$ 12", None, "12"),
    ("12 + 30 = 42 #### 42 <|im_end|>", "42", "42"),
]


@pytest.mark.parametrize("text, strict, flexible", TRICKY)
def test_extract_answer_on_tricky_strings(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("$18", "18"), ("18.0", "18"), ("18.", "18"), (" 18 ", "18"), ("-0.0", "0"),
    ("0.250", "0.25"), ("1e3", "1000"), ("-7", "-7"), ("100000000000000000000", "100000000000000000000"),
    ("abc", None), ("", None), (None, None), ("nan", None), ("inf", None), ("1.2.3", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_score_and_accuracy():
    assert score("so #### 1,000", "1000") == 1.0
    assert score("so #### 1,000", "1000.00") == 1.0
    assert score("so #### 999", "1000") == 0.0
    assert score("the answer is 1000", "1000") == 0.0
    assert score("the answer is 1000", "1000", method="flexible") == 1.0
    assert score("no answer", "5") == 0.0 and score("#### 5", "not a number") == 0.0
    responses = ["#### 3", "#### 4", "it is 5", "#### 6"]
    assert accuracy(responses, ["3", "4", "5", "7"]) == 0.5
    assert accuracy(responses, ["3", "4", "5", "7"], method="flexible") == 0.75


def test_bad_arguments():
    with pytest.raises(ValueError, match="method='loose': must be one of strict|flexible"):
        extract_answer("#### 1", "loose")
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        accuracy(["#### 1", "#### 2"], ["1"])
    with pytest.raises(ValueError, match="empty batch"):
        accuracy([], [])


def test_long_responses_score_quickly():
    import time

    start = time.perf_counter()
    assert score("-" * 50_000 + " 1" * 50_000 + " #### 9", "9") == 1.0
    assert score("$" * 100_000, "9") == 0.0
    assert time.perf_counter() - start < 1.0


def test_gold_answers_score_100_percent(gsm8k_dir):
    answers, truths = [], []
    for split in ("train", "test"):
        for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines():
            answer = json.loads(line)["answer"]
            answers.append(answer)
            truths.append(answer.split("####")[-1].strip().replace(",", ""))
    assert len(answers) == 8792
    assert accuracy(answers, truths, "strict") == 1.0
    assert accuracy(answers, truths, "flexible") == 1.0
