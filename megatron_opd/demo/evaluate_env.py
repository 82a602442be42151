"""The held-out metrics of one checkpoint on the walk with an environment (walk_env.py): conversations on the
embedded engine through the rollout's own code (rollout/conversation.py), the same for every arm:
- success: the environment's reward of the greedy conversation (the goal within d + SLACK moves);
- shortest: the goal in exactly d moves; success by distance d;
- recovery: success after a forced first move away from the goal (ForcedDetour: the conversation opens with
  that move and the environment's answer, the model writes the rest);
- own_samples: how often the model's own conversations at the rollout temperature hold a wrong move (one
  that does not bring the walker closer to the goal), the states on-policy training visits.
Run: .venv/bin/python -m megatron_opd.demo.evaluate_env MODEL_DIR TEST.parquet
"""
import sys

import pyarrow.parquet as pq

from megatron_opd.data.chat import encode_prompt
from megatron_opd.demo.evaluate import forced_detour
from megatron_opd.demo.jobs import TORCH_IN_PROCESS
from megatron_opd.demo.settings import TASKS, TEMPERATURE, Task
from megatron_opd.demo.walk import distance, next_position, parse_ground_truth, parse_moves
from megatron_opd.demo.walk_env import WalkEnvironment
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import Conversation, ConversationLimits, as_text, roll_out
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import SamplingParams


class ForcedDetour(WalkEnvironment):
    """The walk opened with a forced first move away from the goal (evaluate.forced_detour) and the
    environment's answer to it, as the conversation would hold them had the model written that move."""

    def start(self, row: dict) -> list[dict]:
        first = super().start(row)
        move = forced_detour(self.position)
        if move is None:
            raise ValueError(f"no first move away from the goal stays on the board from {self.position}")
        return first + [{"role": "assistant", "content": move}] + self.step(move).messages


def assistant_turns(conversation: Conversation, tokenizer) -> list[str]:
    """The text of each of the model's turns, as the environment read it."""
    turns, at = [], 0
    for assistant, count in conversation.segments:
        if assistant:
            turns.append(tokenizer.decode(conversation.response_ids[at:at + count], skip_special_tokens=True))
        at += count
    return turns


def wrong_move(start, goal, turns: list[str]) -> bool:
    """Whether a turn's move does not bring the walker closer to the goal, up to the goal or the first turn
    that is not one move (where the environment ends the walk)."""
    position = start
    for turn in turns:
        moves = parse_moves(turn)
        if moves is None or len(moves) != 1:
            return False
        before, position = position, next_position(position, moves[0])
        if distance(position, goal) >= distance(before, goal):
            return True
    return False


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
    forced = [i for i, (start, _) in enumerate(problems) if forced_detour(start)]
    result["recovery"] = sum(c.reward for c in talk(ForcedDetour, forced)) / len(forced)
    sampled = talk(WalkEnvironment, everyone, TEMPERATURE)
    slips = [wrong_move(*problem, assistant_turns(c, tokenizer)) for problem, c in zip(problems, sampled)]
    result["own_samples"] = {"wrong_move": sum(slips) / len(slips)}
    result["responses"] = [as_text(c, tokenizer)[0] for c in greedy]
    engine.stop()
    return result


if __name__ == "__main__":
    print(evaluate_conversations(sys.argv[1], pq.read_table(sys.argv[2]).to_pylist(), limits(TASKS["walk_env"])))
