"""rollout.env -> a factory of fresh environments: the built-in names, a module:Class, and bad specs whose
error names the key, the value and the built-ins."""
import pytest

from megatron_opd.demo.walk_env import WalkEnvironment
from megatron_opd.rollout.envs import (
    CalculatorEnvironment, EnvConfigError, Environment, Observation, make_env_factory)


class Echo(Environment):
    def start(self, row):
        return list(row["prompt"])

    def step(self, assistant_text):
        return Observation(messages=[], done=True)


class NeedsArguments(Echo):
    def __init__(self, tools):
        self.tools = tools


class NotAnEnvironment:
    pass


@pytest.mark.parametrize("spec, kind", [("walk", WalkEnvironment), ("tools", CalculatorEnvironment),
                                        ("tests.rollout.envs.test_factory:Echo", Echo)])
def test_a_spec_makes_a_fresh_environment_per_call(spec, kind):
    factory = make_env_factory(spec)
    first, second = factory(), factory()
    assert type(first) is kind and type(second) is kind and first is not second


@pytest.mark.parametrize("spec, problem", [
    ("chess", "must be walk | tools (built in) or module:Class"),
    ("tests.rollout.envs.no_such_module:Echo", "cannot import Echo from tests.rollout.envs.no_such_module"),
    ("tests.rollout.envs.test_factory:Missing", "cannot import Missing from tests.rollout.envs.test_factory"),
    ("tests.rollout.envs.test_factory:NotAnEnvironment", "is not an Environment subclass"),
    ("tests.rollout.envs.test_factory:NeedsArguments", "NeedsArguments() failed: TypeError"),
])
def test_a_bad_spec_names_the_key_the_value_and_the_built_ins(spec, problem):
    with pytest.raises(EnvConfigError) as caught:
        make_env_factory(spec)
    message = str(caught.value)
    assert message.startswith(f"rollout.env={spec!r}: ") and problem in message
    if "failed" not in problem:
        assert "walk | tools" in message
