"""The rollout's guard around environment calls: a start or step that raises, runs past its deadline or
returns something malformed becomes an EnvFailure naming the row, so a faulty environment ends its own
conversation and never the run."""
import math
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Union

from megatron_opd.rollout.envs.base import Environment, Observation, message_problem


@dataclass
class EnvFailure:
    """An environment call that gave no usable answer; the conversation ends there."""
    row_index: int
    message: str  # names the row, the call and what happened


def env_start(env: Environment, row: dict, row_index: int, timeout_s: float) -> Union[list[dict], EnvFailure]:
    """env.start(row), or an EnvFailure when it raises, runs past `timeout_s` or returns no messages."""
    return _guarded(env, "start", row, row_index, timeout_s, _start_problem)


def env_turn(env: Environment, assistant_text: str, row_index: int,
             timeout_s: float) -> Union[Observation, EnvFailure]:
    """env.step(assistant_text), or an EnvFailure when it raises, runs past `timeout_s` or returns something
    that is not a well-formed Observation."""
    return _guarded(env, "step", assistant_text, row_index, timeout_s, _observation_problem)


def _guarded(env, method: str, argument, row_index: int, timeout_s: float, problem_of: Callable):
    call = f"row {row_index}: {type(env).__name__}.{method}"
    outcome = {}

    def run():
        try:
            outcome["result"] = getattr(env, method)(argument)
        except BaseException as err:  # SystemExit too: in a thread it would end the call without a word
            outcome["error"] = err

    # Python cannot kill a thread: a call still running at the deadline is abandoned (a daemon thread, so it
    # does not hold the process at exit), and its environment must not be used again.
    worker = threading.Thread(target=run, name=f"env-{method}-row-{row_index}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return EnvFailure(row_index, f"{call} did not return within {timeout_s:g} s; its thread is abandoned")
    if "error" in outcome:
        err = outcome["error"]
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return EnvFailure(row_index, f"{call} raised {type(err).__name__}: {err} "
                                     f"(at {os.path.basename(frame.filename)}:{frame.lineno})")
    problem = problem_of(outcome["result"])
    return EnvFailure(row_index, f"{call} {problem}") if problem else outcome["result"]


def _start_problem(messages) -> str:
    problem = message_problem(messages)
    if problem:
        return f"returned bad messages: {problem}"
    return "" if messages else "returned no messages: a conversation needs a first message"


def _observation_problem(observation) -> str:
    if not isinstance(observation, Observation):
        return f"returned {type(observation).__name__}, not an Observation: {observation!r:.200}"
    problem = message_problem(observation.messages)
    if problem:
        return f"returned an Observation with bad messages: {problem}"
    reward = observation.reward
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return f"returned reward={reward!r}: it must be a finite number"
    if not isinstance(observation.done, bool):
        return f"returned done={observation.done!r}: it must be True or False"
    if not isinstance(observation.info, dict):
        return f"returned info={observation.info!r:.200}: it must be a dict"
    if not observation.done and not observation.messages:
        return "returned no messages and done=False: a conversation that goes on needs an answer"
    return ""
