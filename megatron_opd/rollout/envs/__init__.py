"""Environments for multi-turn on-policy distillation: between the student's turns an environment answers
(a tool's result, a game's new state) and, at the end, gives the conversation's reward.

base: the interface (Environment, Observation); guard: the rollout's calls with a deadline (env_start,
env_turn -> EnvFailure instead of an exception); factory: rollout.env -> a factory of environments; tools:
tool calls in the Qwen/Hermes format; calculator: the built-in "tools" environment. The built-in "walk" is the
main job's (megatron_opd/demo/walk_env.py)."""
from megatron_opd.rollout.envs.base import Environment, Observation, prompt_messages, row_ground_truth
from megatron_opd.rollout.envs.calculator import CalculatorEnvironment, calculator
from megatron_opd.rollout.envs.factory import BUILT_IN_ENVS, EnvConfigError, make_env_factory
from megatron_opd.rollout.envs.guard import EnvFailure, env_start, env_turn
from megatron_opd.rollout.envs.tools import ToolCallError, ToolEnvironment, tool_schema

__all__ = [
    "BUILT_IN_ENVS", "CalculatorEnvironment", "EnvConfigError", "EnvFailure", "Environment", "Observation",
    "ToolCallError", "ToolEnvironment", "calculator", "env_start", "env_turn",
    "make_env_factory", "prompt_messages", "row_ground_truth", "tool_schema",
]
