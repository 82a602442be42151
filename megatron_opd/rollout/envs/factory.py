"""rollout.env -> a factory of environments: one fresh Environment per conversation, since an environment
keeps its conversation's state.

rollout.env: walk (the main job's walk, megatron_opd/demo/walk_env.py) | tools (the calculator,
megatron_opd/rollout/envs/calculator.py) | `module:Class`, an Environment subclass whose __init__ takes no
arguments, imported from where the trainer runs. The built-in names are such specs too: the walk lives with the
main job's tasks, and the rollout imports nothing of the demo."""
from typing import Callable

from megatron_opd.data.scorers import reward_function
from megatron_opd.rollout.envs.base import Environment

BUILT_IN_ENVS = {"walk": "megatron_opd.demo.walk_env:WalkEnvironment",
                 "tools": "megatron_opd.rollout.envs.calculator:CalculatorEnvironment"}
ENV_KEY = "rollout.env"


class EnvConfigError(ValueError):
    """A rollout.env that names no usable environment; the message names the key, the value and what to do.
    A ValueError, as data's DataConfigError, rather than the run config's ConfigError: importing the config
    from here would tie this room to the config's whole import graph (the config imports the rollout, which
    is to call these environments)."""


def make_env_factory(spec: str) -> Callable[[], Environment]:
    """A zero-argument callable that makes a fresh Environment for each conversation. One is made here, so
    that an environment that cannot be built fails now, naming rollout.env, and not in the middle of a run."""
    choices = f"{' | '.join(BUILT_IN_ENVS)} (built in) or module:Class (an Environment subclass)"
    target = BUILT_IN_ENVS.get(spec, spec)
    if not (isinstance(target, str) and ":" in target):
        raise EnvConfigError(f"{ENV_KEY}={spec!r}: must be {choices}")
    try:
        # The module:attribute import that reward.fn uses, with its messages.
        factory = reward_function(target)
    except ValueError as err:
        raise EnvConfigError(f"{ENV_KEY}={spec!r}: {err}; must be {choices}") from None
    if not (isinstance(factory, type) and issubclass(factory, Environment)):
        raise EnvConfigError(f"{ENV_KEY}={spec!r}: {factory!r} is not an Environment subclass "
                             f"(megatron_opd.rollout.envs.Environment); must be {choices}")
    try:
        factory()
    except Exception as err:
        raise EnvConfigError(f"{ENV_KEY}={spec!r}: {factory.__name__}() failed: {type(err).__name__}: {err} "
                             f"(each conversation's environment is made with no arguments)") from None
    return factory
