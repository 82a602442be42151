"""The "tools" environment's built-in tool, GSM8K's example: a calculator for arithmetic only. The expression
is parsed with `ast` and only numbers, + - * / // % ** (and unary + -) and parentheses are evaluated; anything
else is refused by name, nothing reaches eval."""
import ast
import math
import operator

from megatron_opd.rollout.envs.tools import ToolEnvironment

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = "numbers, + - * / // % ** and parentheses"
# Integers past this size take seconds and gigabytes to form ("9**9**9"): refused before they are computed.
MAX_BITS = 4096


def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(48 + 24) / 2"
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"{expression!r} is not an arithmetic expression ({err.msg})") from None
    value = _evaluate(tree.body)
    # 84 / 2 is 42.0; a whole number is written as one, as GSM8K's answers are
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _refuse_huge(node, left, right)
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{ast.unparse(node)!r} has no finite real value")
        return value
    raise ValueError(f"{ast.unparse(node)!r} is not allowed: only {ALLOWED}")


def _refuse_huge(node: ast.BinOp, left, right) -> None:
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # floats overflow to an error or inf, quickly
    if isinstance(node.op, ast.Pow):
        bits = abs(left).bit_length() * max(right, 0)
    elif isinstance(node.op, ast.Mult):
        bits = abs(left).bit_length() + abs(right).bit_length()
    else:
        return
    if bits > MAX_BITS:
        raise ValueError(f"{ast.unparse(node)!r} is too large (over {MAX_BITS} bits)")


class CalculatorEnvironment(ToolEnvironment):
    """rollout.env=tools: the calculator as the one tool."""

    def __init__(self):
        super().__init__({"calculator": calculator})
