"""The README's example environment is this file, verbatim, and it runs: a config names it, and a
conversation with it gets the hints and the reward."""
import os

from megatron_opd.config import to_config
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import ConversationLimits, roll_out
from megatron_opd.rollout.engine import SamplingParams
from examples.envs.guess_number import GuessNumber
from tests.conftest import distill_overrides
from tests.rollout.stand_in import StandInEngine
from tests.runs import composed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "envs", "guess_number.py")


def test_the_readme_shows_the_example_as_it_is():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"```python\n{open(EXAMPLE).read()}```" in readme


def test_the_example_plays_a_conversation(distill_setup, tiny_tokenizer, tmp_path):
    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path,
                                                "rollout.env=examples.envs.guess_number:GuessNumber")))
    assert cfg.rollout.env == "examples.envs.guess_number:GuessNumber"
    row = {"prompt": [], "extra_info": {"index": 4}}
    env = GuessNumber()
    env.start(row)
    low, secret = max(1, env.secret - 1), env.secret
    end = tiny_tokenizer.eos_token_id
    script = [tiny_tokenizer.encode(f"{low}") + [end], tiny_tokenizer.encode(f"it is {secret}") + [end]]
    [conversation] = roll_out(StandInEngine(script, end), ChatTurns(tiny_tokenizer), GuessNumber, [row], [4], [[1]],
                              SamplingParams(seed=0), ConversationLimits(max_turns=7, max_tokens=200))
    text = tiny_tokenizer.decode(conversation.response_ids, skip_special_tokens=False)
    assert f"{low}: higher." in text if low < secret else conversation.turns == 1
    assert (conversation.reward, conversation.ending) == (1.0, "done")
