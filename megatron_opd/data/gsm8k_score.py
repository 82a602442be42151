"""GSM8K scoring: pull the final answer out of a response and compare it, as a number, with the ground truth.

strict:   the number right after the last "####" (GSM8K's own answer format, which the prompt asks for).
flexible: the last number anywhere in the response (for models that ignore the format).
Numbers are compared after normalising: "1,000" == "1000", "$18" == "18", "18.0" == "18", "18." == "18".
"""
import re
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

METHODS = ("strict", "flexible")
# A minus sign counts only when it touches the digits and does not follow a word ("3-4" and "x-1" are not
# negative); "$" may sit either side of it. No run of optional whitespace is ambiguous, so matching stays linear.
_NUMBER = r"(?<![\w.])(?:-\$?|\$\s?-?)?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: Optional[str]) -> Optional[str]:
    """The canonical form of a number written in text ("-1,000.50" -> "-1000.5"), or None if it is not one."""
    if text is None:
        return None
    cleaned = re.sub(r"[\s$,]", "", text).rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, method: str = "strict") -> Optional[str]:
    """The response's final answer, normalised, or None when there is none."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {'|'.join(METHODS)}")
    matches = (_STRICT if method == "strict" else _ANY_NUMBER).findall(text)
    return normalize_number(matches[-1]) if matches else None


def score(response: str, ground_truth: str, method: str = "strict") -> float:
    """1.0 when the response's answer equals the ground truth as a number, else 0.0."""
    answer = extract_answer(response, method)
    return float(answer is not None and answer == normalize_number(ground_truth))


def accuracy(responses: Sequence[str], ground_truths: Sequence[str], method: str = "strict") -> float:
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if not responses:
        raise ValueError("accuracy of an empty batch is undefined")
    return sum(score(r, t, method) for r, t in zip(responses, ground_truths)) / len(responses)
