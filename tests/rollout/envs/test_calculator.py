"""The built-in calculator: arithmetic only, parsed with ast; anything else, and numbers too large to form,
are refused by name."""
import pytest

from megatron_opd.rollout.envs import calculator


@pytest.mark.parametrize("expression, value", [
    ("(48 + 24) / 2", 36), ("48 / 5", 9.6), ("7 // 2", 3), ("7 % 4", 3), ("2 ** 10", 1024), ("-3 ** 2", -9),
    ("+4 - -1", 5), ("0.1 * 3", 0.30000000000000004), (" 12*(3 -1) ", 24)])
def test_arithmetic(expression, value):
    result = calculator(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os').system('echo hacked')", "is not allowed: only numbers, + - * / // % ** and parentheses"),
    ("x + 1", "'x' is not allowed"),
    ("True + 1", "'True' is not allowed"),
    ("'a' * 3", "\"'a'\" is not allowed"),
    ("3 < 4", "'3 < 4' is not allowed"),
    ("2 @ 3", "'2 @ 3' is not allowed"),
    ("2 ** 5000", "'2 ** 5000' is too large (over 4096 bits)"),
    ("9 ** 9 ** 9", "'9 ** 9 ** 9' is too large"),
    ("(10 ** 1000) * (10 ** 1000) * 10 ** 1000", "is too large"),
    ("(-8) ** 0.5", "'(-8) ** 0.5' has no finite real value"),
    ("1e308 * 10", "has no finite real value"),
    ("48 +", "'48 +' is not an arithmetic expression"),
])
def test_anything_else_is_refused_by_name(expression, problem):
    with pytest.raises(ValueError) as caught:
        calculator(expression)
    assert problem in str(caught.value)


def test_a_non_string_is_refused():
    with pytest.raises(ValueError, match="expression must be a string, got int"):
        calculator(42)
