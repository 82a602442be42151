"""The walk with an environment (walk_env.py) as training rows: each conversation written as text exactly as
a rollout of the same moves leaves it (rollout/conversation.py's as_text), with the character spans to train
without (data.response_skip_key).

The text comes from the chat template the way ChatTurns builds a rollout's ids: an assistant turn is its move
and the template's stop token; after it, what the template writes up to the next generation prompt with the
environment's answer inside (the difference of two renderings of a probe conversation); the final stop token
is left off (the trainer appends the eos). The moves are plain ("R"): the environment keeps the position.

The oracle walks across to the goal's column first, then along it (`across_first`): each move is then a
function of the way left that the environment has just written, which the 4-layer teacher learns; with the
single-turn walk's random order of moves, where most turns have two right answers, it stayed at the
marginal (R or U at even odds, whatever the way left) after 150 steps.
"""
import random
from functools import lru_cache
from typing import Collection, Iterator

from transformers.utils.chat_template_utils import render_jinja_template

from megatron_opd.demo.tiny import CHAT_TEMPLATE
from megatron_opd.demo.walk import DISTANCES, SLACK, next_position, parse_ground_truth, perturbed_walk, walk_rows
from megatron_opd.demo.walk_env import WalkEnvironment

STOP = "<|im_end|>"  # the template's end of a turn: the tokenizer's eos, where the engine stops
MAX_MOVES = max(DISTANCES) + SLACK  # the environment's budget on the farthest goal (rollout.max_turns)
_PROBE = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "probe"}]


def render(messages: list[dict], generation: bool) -> str:
    """The chat template's text of `messages` (with the assistant's generation prompt when `generation`)."""
    return render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=generation)[0][0]


@lru_cache(maxsize=None)
def after_turn(answer: str) -> str:
    """What follows an assistant turn's stop token when the environment answers `answer`: the rest of the
    turn's closing, the answer as a user message and the next generation prompt."""
    ended = render(_PROBE, False)
    ended = ended[:ended.rindex(STOP) + len(STOP)]
    return render(_PROBE + [{"role": "user", "content": answer}], True)[len(ended):]


def across_first(position, goal) -> str:
    """The oracle's move from `position`: towards the goal's column, and once there towards the goal."""
    dx, dy = goal[0] - position[0], goal[1] - position[1]
    return ("R" if dx > 0 else "L") if dx else ("U" if dy > 0 else "D")


def oracle_walk(start, goal) -> list[str]:
    moves, position = [], start
    while position != goal:
        moves.append(across_first(position, goal))
        position = next_position(position, moves[-1])
    return moves


def conversation(row: dict, walk: list[tuple[str, bool]]) -> tuple[list[dict], str, list, list]:
    """(first messages, text after them, the environment's spans, the detour turns' spans) when the student
    plays `walk`, (move, is_detour) pairs, on `row`'s walk to its end; a detour turn's span covers its move
    and its stop token."""
    env = WalkEnvironment()
    first, text, env_spans, detours = env.start(row), "", [], []
    for turn, (move, detour) in enumerate(walk, 1):
        if detour:
            detours.append([len(text), len(text) + len(move) + len(STOP)])
        text += move + STOP
        observation = env.step(move)
        if observation.done:
            if turn < len(walk):
                raise ValueError(f"the walk ended after {turn} of its {len(walk)} moves")
            return first, text[:-len(STOP)], env_spans, detours
        after = after_turn(observation.messages[0]["content"])
        env_spans.append([len(text), len(text) + len(after)])
        text += after
    raise ValueError(f"the walk's {len(walk)} moves leave the conversation open")


def conversation_rows(num_rows: int, seed: int = 0, split: str = "train",
                      exclude: Collection[str] = ()) -> Iterator[dict]:
    """walk_rows (the same start/goal pairs) with the environment's first message as the prompt and the oracle
    walk's conversation as extra_info.answer; extra_info.skip: its environment's spans."""
    for row in walk_rows(num_rows, seed, split, exclude):
        moves = [(move, False) for move in oracle_walk(*parse_ground_truth(row["reward_model"]["ground_truth"]))]
        row["prompt"], text, env_spans, _ = conversation(row, moves)
        row["extra_info"].update(answer=text, skip=env_spans)
        yield row


def detour_conversation_rows(num_rows: int, seed: int = 0, exclude: Collection[str] = (),
                             detour_rate: float = 0.2, overshoot_rate: float = 0.5) -> Iterator[dict]:
    """The teacher's training rows: `perturbed_walk`s as conversations, extra_info.skip both the environment's
    spans and the detour turns (the teacher learns to get back on course, its own samples show no detour).
    A detour is any move away from the goal, and in half the walks one more move across past the goal's
    column: the students' usual slip, measured (163 of 200 of a cold-start student's wrong moves). With
    random detours alone (a way left of -1 in one walk in ten) the teacher still answered R there, P(L) 0.08
    after 100 steps, and on-policy training taught that."""
    rng = random.Random(f"walk-env-detours-{seed}")
    for row in conversation_rows(num_rows, seed, "teacher", exclude):
        walk = perturbed_walk(rng, *parse_ground_truth(row["reward_model"]["ground_truth"]), detour_rate, across_first,
                              detours_from="URDL", overshoot_rate=overshoot_rate)
        _, text, env_spans, detours = conversation(row, walk)
        row["extra_info"].update(answer=text, skip=sorted(env_spans + detours))
        yield row
