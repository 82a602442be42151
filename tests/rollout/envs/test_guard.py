"""The rollout's guard: an environment that raises, hangs or returns garbage yields an EnvFailure naming the
row and what happened, never an exception; a good answer passes through unchanged."""
import threading
import time

import pytest

from megatron_opd.rollout.envs import EnvFailure, Environment, Observation, env_start, env_turn

ROW = {"prompt": [{"role": "user", "content": "2 + 2?"}]}
RELEASE = threading.Event()  # set at the end of the module: the hung call's abandoned thread then ends


class Scripted(Environment):
    """start returns `first`; step returns `answer`, or raises it when it is an exception."""

    def __init__(self, first=None, answer=None):
        self.first, self.answer = first, answer

    def start(self, row):
        return self.first if self.first is not None else list(row["prompt"])

    def step(self, assistant_text):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class Hung(Scripted):
    def step(self, assistant_text):
        RELEASE.wait(30)
        return Observation(messages=[], done=True)


@pytest.fixture(scope="module", autouse=True)
def release_hung_threads():
    yield
    RELEASE.set()


def test_a_good_answer_passes_through():
    answer = Observation(messages=[{"role": "user", "content": "at 1 1"}], info={"moves": 1})
    assert env_turn(Scripted(answer=answer), "U", row_index=3, timeout_s=5) is answer
    assert env_start(Scripted(), ROW, row_index=3, timeout_s=5) == ROW["prompt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit(2)])
def test_a_raising_step_is_a_failure_naming_the_row(error):
    failure = env_turn(Scripted(answer=error), "U", row_index=7, timeout_s=5)
    assert isinstance(failure, EnvFailure) and failure.row_index == 7
    assert failure.message.startswith(f"row 7: Scripted.step raised {type(error).__name__}: {error} (at test_guard.py:")


def test_a_step_past_its_deadline_is_a_failure_in_time():
    began = time.monotonic()
    failure = env_turn(Hung(), "U", row_index=4, timeout_s=0.2)
    assert time.monotonic() - began < 1.0
    assert failure == EnvFailure(4, "row 4: Hung.step did not return within 0.2 s; its thread is abandoned")


@pytest.mark.parametrize("answer, problem", [
    ("at 1 1", "returned str, not an Observation"),
    (Observation(messages="at 1 1"), "bad messages: messages must be a list"),
    (Observation(messages=[{"role": "user"}]), "bad messages: message 0 is not a {'role': str, 'content': str}"),
    (Observation(messages=[], reward=float("nan"), done=True), "reward=nan: it must be a finite number"),
    (Observation(messages=[], reward="1", done=True), "reward='1': it must be a finite number"),
    (Observation(messages=[], done=1), "done=1: it must be True or False"),
    (Observation(messages=[], done=True, info=None), "info=None: it must be a dict"),
    (Observation(messages=[]), "returned no messages and done=False"),
])
def test_a_malformed_answer_is_a_failure_saying_what_is_wrong(answer, problem):
    failure = env_turn(Scripted(answer=answer), "U", row_index=9, timeout_s=5)
    assert isinstance(failure, EnvFailure) and failure.message.startswith("row 9: Scripted.step returned")
    assert problem in failure.message


@pytest.mark.parametrize("first, problem", [
    ([], "returned no messages"), ([{"role": "user", "content": 3}], "returned bad messages: message 0")])
def test_a_bad_start_is_a_failure_naming_the_row(first, problem):
    failure = env_start(Scripted(first=first), ROW, row_index=2, timeout_s=5)
    assert isinstance(failure, EnvFailure) and failure.message.startswith(f"row 2: Scripted.start {problem}")
