"""The held-out metrics of one checkpoint on the walk with an environment (walk_env.py): conversations on the
embedded engine through the rollout's own code (rollout/conversation.py), the same for every arm:
- success: the environment's reward of the greedy conversation (the goal within d + SLACK moves);
- shortest: the goal in exactly d moves; success by distance d;
- recovery: success after a forced first move away from the goal (ForcedDetour: the conversation opens with
  that move and the environment's answer, the model writes the rest); overshoot_recovery: the same after
  the oracle's moves across and one more past the goal's column (ForcedOvershoot), the students' usual slip;
- own_samples: how often the model's own conversations at the rollout temperature hold a wrong move (one
  that does not bring the walker closer to the goal), and over their turns how often the move the teacher was
  trained to make there (the across-first oracle's) is R and U: the states on-policy training visits and what
  it is told there. (The teacher's own most likely move agreed with the oracle's on 98% of a cold-start
  student's sampled turns, 451 turns of 64 prompts, measured once.)
Run: .venv/bin/python -m megatron_opd.demo.evaluate_env MODEL_DIR TEST.parquet
"""
import sys

import pyarrow.parquet as pq

from megatron_opd.data.chat import encode_prompt
from megatron_opd.demo.evaluate import forced_detour
from megatron_opd.demo.jobs import TORCH_IN_PROCESS
from megatron_opd.demo.settings import TASKS, TEMPERATURE, Task
from megatron_opd.demo.walk import distance, next_position, on_board, parse_ground_truth, parse_moves
from megatron_opd.demo.walk_env import WalkEnvironment
from megatron_opd.demo.walk_turns import across_first, oracle_walk
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import Conversation, ConversationLimits, as_text, roll_out
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import SamplingParams


class ForcedDetour(WalkEnvironment):
    """The walk opened with a forced first move away from the goal (evaluate.forced_detour) and the
    environment's answer to it, as the conversation would hold them had the model written that move."""

    @staticmethod
    def opening(start, goal) -> list[str] | None:
        move = forced_detour(start)
        return None if move is None else [move]

    def start(self, row: dict) -> list[dict]:
        messages = super().start(row)
        moves = self.opening(self.position, self.goal)
        if moves is None:
            raise ValueError(f"{type(self).__name__}: no opening from {self.position} to {self.goal}")
        for move in moves:
            messages += [{"role": "assistant", "content": move}] + self.step(move).messages
        return messages


class ForcedOvershoot(ForcedDetour):
    """The walk opened with the oracle's moves across to the goal's column and one more past it: the students'
    usual slip (a cold-start student's own wrong moves are mostly this one)."""

    @staticmethod
    def opening(start, goal) -> list[str] | None:
        if goal[1] == start[1] or not on_board((goal[0] + 1, start[1])):  # the goal reached first, or off the board
            return None
        return oracle_walk(start, (goal[0], start[1])) + ["R"]


# success after each forced slip: the teacher's premise (settings.RECOVERY_REQUIRED) and a measure of every arm
RECOVERIES = {"recovery": ForcedDetour, "overshoot_recovery": ForcedOvershoot}


def assistant_turns(conversation: Conversation, tokenizer) -> list[str]:
    """The text of each of the model's turns, as the environment read it."""
    turns, at = [], 0
    for assistant, count in conversation.segments:
        if assistant:
            turns.append(tokenizer.decode(conversation.response_ids[at:at + count], skip_special_tokens=True))
        at += count
    return turns


def walked(start, goal, turns: list[str]) -> list[tuple]:
    """(position before, move) of each turn, up to the goal or the first turn that is not one move (where the
    environment ends the walk)."""
    position, steps = start, []
    for turn in turns:
        moves = parse_moves(turn)
        if moves is None or len(moves) != 1 or position == goal:
            break
        steps.append((position, moves[0]))
        position = next_position(position, moves[0])
    return steps


def wrong_move(start, goal, turns: list[str]) -> bool:
    """Whether a turn's move does not bring the walker closer to the goal."""
    return any(distance(next_position(at, move), goal) >= distance(at, goal) for at, move in walked(start, goal, turns))


def oracle_moves(start, goal, turns: list[str]) -> list[str]:
    """The oracle's move (across_first) at the state each turn starts from."""
    return [across_first(at, goal) for at, _ in walked(start, goal, turns)]


def limits(task: Task) -> ConversationLimits:
    """The conversations' limits of `task`, the same as its runs' (rollout.max_turns, response_length,
    max_turn_tokens)."""
    return ConversationLimits(task.conversations.max_turns, task.response_tokens, task.conversations.max_turn_tokens)


def evaluate_conversations(model_dir: str, rows: list[dict], limits: ConversationLimits) -> dict:
    from transformers import AutoTokenizer

    with TORCH_IN_PROCESS:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        engine = EmbeddedEngine(model_dir)
        engine.start()
    chat = ChatTurns(tokenizer)

    def talk(env, chosen: list[int], temperature: float = 0.0) -> list[Conversation]:
        sampling = SamplingParams(temperature=temperature, stop_token_ids=(tokenizer.eos_token_id,), seed=0)
        return roll_out(engine, chat, env, [rows[i] for i in chosen], chosen,
                        [encode_prompt(tokenizer, rows[i]["prompt"]) for i in chosen], sampling, limits)

    everyone = list(range(len(rows)))
    problems = [parse_ground_truth(row["reward_model"]["ground_truth"]) for row in rows]
    greedy = talk(WalkEnvironment, everyone)
    distances = [distance(start, goal) for start, goal in problems]
    result = {"success": sum(c.reward for c in greedy) / len(rows), "prompts": len(rows),
              "shortest": sum(c.reward == 1 and c.turns == d for c, d in zip(greedy, distances)) / len(rows)}
    by_distance = {}
    for conversation, d in zip(greedy, distances):
        by_distance.setdefault(d, []).append(conversation.reward)
    result["success_by_distance"] = {d: sum(v) / len(v) for d, v in sorted(by_distance.items())}
    for metric, env in RECOVERIES.items():
        forced = [i for i, problem in enumerate(problems) if env.opening(*problem)]
        result[metric] = sum(c.reward for c in talk(env, forced)) / len(forced)
    sampled = talk(WalkEnvironment, everyone, TEMPERATURE)
    turns = [assistant_turns(c, tokenizer) for c in sampled]
    slips = [wrong_move(*problem, texts) for problem, texts in zip(problems, turns)]
    told = [move for problem, texts in zip(problems, turns) for move in oracle_moves(*problem, texts)]
    result["own_samples"] = {"wrong_move": sum(slips) / len(slips),
                             **{f"oracle_{name}": told.count(move) / max(len(told), 1) for move, name in
                                (("R", "right"), ("U", "up"))}}
    result["responses"] = [as_text(c, tokenizer)[0] for c in greedy]
    engine.stop()
    return result


if __name__ == "__main__":
    print(evaluate_conversations(sys.argv[1], pq.read_table(sys.argv[2]).to_pylist(), limits(TASKS["walk_env"])))
