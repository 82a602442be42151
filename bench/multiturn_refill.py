"""The embedded engine's multi-turn cost of re-filling: it keeps no KV cache between generate calls, so each turn
prefills every conversation's ids again. What share of a rollout's time those prefills take bounds what keeping
the cache could save.

    python bench/multiturn_refill.py [--hidden 128 --layers 4 --conversations 32 --turns 8 --turn-tokens 8]

A tiny Qwen2 (random weights, the tiny tokenizer; fp32, CPU) and an environment that answers every turn with
--env-words words until --turns turns: each turn samples --turn-tokens tokens (max_turn_tokens) and is closed
and answered. The rollout: `roll_out` as the trainer runs it (one generate call per turn for every open
conversation). The prefills: for each turn, one generate call of one new token on the ids that turn sent (the
same batch). A continued cache would still prefill each turn's new environment tokens, so the prefills' share
is an upper bound of what it saves.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint  # noqa: E402
from megatron_opd.rollout.chat_turns import ChatTurns  # noqa: E402
from megatron_opd.rollout.conversation import ConversationLimits, roll_out  # noqa: E402
from megatron_opd.rollout.embedded_engine import EmbeddedEngine  # noqa: E402
from megatron_opd.rollout.engine import SamplingParams  # noqa: E402
from megatron_opd.rollout.envs import Environment, Observation  # noqa: E402

ARGS = None


class Answers(Environment):
    def start(self, row):
        self.turns = 0
        return [{"role": "user", "content": row["prompt"][0]["content"]}]

    def step(self, assistant_text):
        self.turns += 1
        return Observation([{"role": "user", "content": " ".join(["ok"] * ARGS.env_words)}],
                           done=self.turns == ARGS.turns)


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=8)
    parser.add_argument("--env-words", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    ARGS = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, "qwen2", seed=0, tokenizer=tokenizer, hidden_size=ARGS.hidden,
                                     intermediate_size=ARGS.hidden * 3, num_hidden_layers=ARGS.layers)
        engine = EmbeddedEngine(path)
        engine.start()
        chat = ChatTurns(tokenizer)
        rows = [{"prompt": [{"role": "user", "content": f"question {k}: go on"}]} for k in range(ARGS.conversations)]
        limits = ConversationLimits(ARGS.turns, 10_000, ARGS.turn_tokens)
        rollouts, prefills = [], []
        for repeat in range(ARGS.repeats):
            sampling = SamplingParams(temperature=1.0, seed=repeat, stop_token_ids=(tokenizer.eos_token_id,))
            started = time.perf_counter()
            conversations = roll_out(engine, chat, Answers, rows, list(range(len(rows))), [[0]] * len(rows),
                                     sampling, limits)
            rollouts.append(time.perf_counter() - started)
            started = time.perf_counter()
            for turn in range(ARGS.turns):
                engine.generate([sent_at(c, turn) for c in conversations], SamplingParams(max_new_tokens=1, seed=0))
            prefills.append(time.perf_counter() - started)
    rollout, prefill = statistics.median(rollouts), statistics.median(prefills)
    sent = sum(c.sent_tokens for c in conversations)
    print(f"{ARGS.conversations} conversations x {ARGS.turns} turns of {ARGS.turn_tokens} tokens, "
          f"{len(conversations[0].response_ids)} tokens after the prompt, {sent} ids sent over the turns; hidden "
          f"{ARGS.hidden}, {ARGS.layers} layers, {torch.get_num_threads()} threads, median of {ARGS.repeats}")
    print(f"rollout {rollout:.2f} s, of which the turns' prefills {prefill:.2f} s ({prefill / rollout:.0%})")


def sent_at(conversation, turn: int) -> list[int]:
    """The ids a conversation sent at `turn`: its prompt and its first 2 x turn segments (assistant, answer)."""
    return conversation.prompt_ids + conversation.response_ids[:sum(n for _, n in conversation.segments[:2 * turn])]


if __name__ == "__main__":
    main()
