"""The walk with an environment in the main job (walk_turns.py, evaluate_env.py): a training row's text is
what a rollout of the same moves leaves (re-encoded, the rollout's ids; its spans the environment's parts and,
for the teacher, the detour turns whole); the forced-detour conversation opens as a rollout of that move
would stand; the evaluation's measures equal a scripted policy's known outcomes; the task's limits let the
longest walk finish. The tokenizer is the task's, loaded from a checkpoint as the trainer and engine load it."""
import re

import pytest
from transformers import AutoTokenizer

from megatron_opd.data.chat import encode_prompt
from megatron_opd.demo import evaluate_env
from megatron_opd.demo.evaluate_env import ForcedDetour, ForcedOvershoot, evaluate_conversations, limits
from megatron_opd.demo.settings import TASKS
from megatron_opd.demo.tasks import _corpus
from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint
from megatron_opd.demo.walk import distance, next_position, parse_ground_truth
from megatron_opd.demo.walk_env import WalkEnvironment
from megatron_opd.demo.walk_turns import MAX_MOVES, across_first, conversation_rows, detour_conversation_rows
from megatron_opd.models.batch import response_loss_mask
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import as_text, roll_out
from megatron_opd.rollout.engine import Sample, SamplingParams
from tests.rollout.scripted_policy import scripted_checkpoint
from tests.rollout.stand_in import StandInEngine

LIMITS = limits(TASKS["walk_env"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2 with the task's tokenizer (trained on its conversations, as tasks.write_task does)."""
    tokenizer = train_tokenizer(_corpus("walk_env", list(conversation_rows(300))), 400)
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("walk_env") / "model"), "qwen2", seed=3,
                                 tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def played(tokenizer, row: dict, turns: list[str], env=WalkEnvironment):
    """The conversation of `row` when the model writes `turns`, one a turn, each ended by the stop token."""
    end = tokenizer.eos_token_id
    engine = StandInEngine([tokenizer.encode(turn, add_special_tokens=False) + [end] for turn in turns], end)
    [conversation] = roll_out(engine, ChatTurns(tokenizer), env, [row], [0], [[end]],
                              SamplingParams(temperature=0.0), LIMITS)
    return conversation


def moves_of(text: str) -> list[str]:
    return [text[0]] + re.findall(r"assistant\n([URDL])", text)


@pytest.mark.parametrize("rows, least_detoured", [(list(conversation_rows(20, split="test")), 0),
                                                 (list(detour_conversation_rows(40)), 20)], ids=["oracle", "detours"])
def test_a_rows_text_is_a_rollout_of_its_moves_and_its_spans_the_parts_without_loss(tokenizer, rows, least_detoured):
    detoured = overshot = 0
    for row in rows:
        text, skip = row["extra_info"]["answer"], row["extra_info"]["skip"]
        moves = moves_of(text)
        (x0, y0), (x1, y1) = parse_ground_truth(row["reward_model"]["ground_truth"])
        if not least_detoured:  # the oracle: across to the goal's column, then up
            assert moves == ["R"] * (x1 - x0) + ["U"] * (y1 - y0)
        conversation = played(tokenizer, row, moves)
        assert (conversation.ending, conversation.reward, conversation.turns) == ("done", 1.0, len(moves))
        # what the trainer makes of the row (data.response_key, response_skip_key): the rollout's ids, its loss
        # mask but for the detour turns (the move and its stop token)
        assert encode_prompt(tokenizer, row["prompt"]) == conversation.prompt_ids
        encoded = tokenizer(text + tokenizer.eos_token, add_special_tokens=False, return_offsets_mapping=True)
        assert encoded["input_ids"] == conversation.response_ids
        away, position = [], (x0, y0)  # the detour turns: the moves away from the goal
        for move in moves:
            away.append(distance(next_position(position, move), (x1, y1)) > distance(position, (x1, y1)))
            position = next_position(position, move)
        expected, turn = [], iter(away)
        for assistant, count in conversation.segments:
            expected += [float(assistant and not next(turn))] * count
        assert response_loss_mask(encoded["offset_mapping"], skip) == expected
        env_spans = as_text(conversation, tokenizer)[1]
        assert as_text(conversation, tokenizer)[0] == text and set(map(tuple, env_spans)) <= set(map(tuple, skip))
        detoured += len(skip) > len(env_spans)
        overshot += any(a and move in "UR" for a, move in zip(away, moves))  # past the goal's column or row
    assert detoured >= least_detoured and (detoured == 0) == (least_detoured == 0)
    assert (overshot > 0) == (detoured > 0)
    # past the goal's column, the students' usual slip: 14 of these 40 rows (5 from random detours alone)
    past_column = sum("left -1 " in row["extra_info"]["answer"] for row in rows)
    assert past_column >= 10 if least_detoured else past_column == 0


def test_the_forced_detour_opens_where_a_rollout_of_that_move_stands(tokenizer):
    for ground_truth, forced in [("3 4 8 9", "L"), ("0 2 6 8", "D")]:
        row = {"reward_model": {"ground_truth": ground_truth}}
        (x0, y0), (x1, y1) = parse_ground_truth(ground_truth)
        rest = ["R"] * (x1 - x0 + (forced == "L")) + ["U"] * (y1 - y0 + (forced == "D"))
        walked = played(tokenizer, row, [forced] + rest)
        opened = played(tokenizer, row, rest, ForcedDetour)
        assert (opened.prompt_ids + opened.response_ids == walked.prompt_ids + walked.response_ids)
        assert (opened.reward, opened.turns, walked.turns) == (1.0, len(rest), len(rest) + 1)
        env = ForcedDetour()
        env.start(row)
        assert env.moves == 1  # the forced move counts against the budget
    with pytest.raises(ValueError, match=r"ForcedDetour: no opening from \(0, 0\) to \(5, 5\)"):
        ForcedDetour().start({"reward_model": {"ground_truth": "0 0 5 5"}})


def test_the_forced_overshoot_opens_past_the_goals_column_where_a_rollout_stands(tokenizer):
    row = {"reward_model": {"ground_truth": "2 1 5 7"}}
    opening = ["R", "R", "R", "R"]  # across to x = 5, and one more
    assert ForcedOvershoot.opening((2, 1), (5, 7)) == opening
    rest = ["L"] + ["U"] * 6
    walked, opened = played(tokenizer, row, opening + rest), played(tokenizer, row, rest, ForcedOvershoot)
    assert opened.prompt_ids + opened.response_ids == walked.prompt_ids + walked.response_ids
    assert (opened.reward, opened.turns, walked.turns) == (1.0, len(rest), len(rest) + len(opening))
    assert "at 6 1, left -1 6" in tokenizer.decode(opened.prompt_ids)
    # none where the goal is on the start's row (reached before the overshoot) or the move past leaves the board
    assert ForcedOvershoot.opening((2, 1), (9, 7)) is None and ForcedOvershoot.opening((0, 3), (8, 3)) is None
    assert ForcedOvershoot.opening((5, 0), (5, 8)) == ["R"]


def test_the_evaluation_of_a_policy_that_always_moves_right(checkpoint, tokenizer, tmp_path):
    """The scripted checkpoint writes R after every generation prompt: it reaches a goal straight to the right
    (shortest), slips once it passes the goal's column, and recovers from a forced L only on the goal's row."""
    newline, right = (tokenizer.encode(t, add_special_tokens=False)[0] for t in ("\n", "R"))
    model = scripted_checkpoint(checkpoint, str(tmp_path / "right"), {newline: right, right: tokenizer.eos_token_id})
    truths = ["2 3 9 3", "1 0 8 0", "0 4 3 9", "4 1 6 6", "0 0 2 5", "2 2 9 2"]
    rows = [{"prompt": [{"role": "user", "content": "walk"}], "reward_model": {"ground_truth": t}} for t in truths]
    result = evaluate_conversations(model, rows, LIMITS)
    assert result.pop("responses")[0] == "R<|im_end|>" + (
        "\n<|im_start|>user\nat {} 3, left {} 0<|im_end|>\n<|im_start|>assistant\nR<|im_end|>" * 6).format(
        *[v for x in range(3, 9) for v in (x, 9 - x)])[:-len("<|im_end|>")]
    # rows 1, 2 and 6 lie on the goal's row; "0 0 2 5" has no first move away from the goal on the board; past
    # the goal's column it never turns back (and rows 1, 2, 6 have no overshoot: the goal comes first). The
    # states its samples visit: 7 R on each goal row; "0 4 3 9" R R R, at the column U, past it L L (then out of
    # reach); "4 1 6 6" and "0 0 2 5" R R U L L: 37 turns, the oracle's move R in 28, U in 3
    assert result == {"success": 3 / 6, "shortest": 3 / 6, "prompts": 6, "success_by_distance": {7: 3 / 5, 8: 0.0},
                      "recovery": 3 / 5, "overshoot_recovery": 0 / 3,
                      "own_samples": {"wrong_move": 3 / 6, "oracle_right": 28 / 37, "oracle_up": 3 / 37}}


class StepBackFirst:
    """An engine (evaluate_env.EmbeddedEngine's place) that plays a rule on the conversation so far: before the
    environment has answered, D (a step away from the goal); after, the oracle's move from where it says the
    walker stands. Sampling changes nothing."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def start(self):
        pass

    def stop(self):
        pass

    def generate(self, prompts, sampling):
        samples = []
        for prompt in prompts:
            answers = re.findall(r"at (-?\d+) (-?\d+), left (-?\d+) (-?\d+)", self.tokenizer.decode(prompt))
            move = "D"
            if answers:
                x, y, dx, dy = map(int, answers[-1])
                move = across_first((x, y), (x + dx, y + dy))
            ids = self.tokenizer.encode(move, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            samples.append(Sample(list(prompt), ids, [0.0] * len(ids), "stop", 0))
        return samples


def test_the_measures_of_a_walker_that_steps_back_first(checkpoint, monkeypatch):
    """Success in d + 2 moves is not shortest and holds a wrong move; D from the bottom row leaves the board;
    after a forced first move the oracle recovers. Its turns start from 24 states: "2 3 9 3" the first (R) and
    from one row down 7 R and U; "0 1 3 9" the first (R), 3 R and 9 U; the other two one each (R), off the board
    after it: the oracle's move R in 14, U in 10."""
    monkeypatch.setattr(evaluate_env, "EmbeddedEngine", StepBackFirst)
    truths = ["2 3 9 3", "0 1 3 9", "4 0 6 6", "0 0 2 5"]
    rows = [{"prompt": [{"role": "user", "content": "walk"}], "reward_model": {"ground_truth": t}} for t in truths]
    result = evaluate_conversations(checkpoint, rows, LIMITS)
    del result["responses"]
    assert result == {"success": 2 / 4, "shortest": 0.0, "prompts": 4, "recovery": 3 / 3, "overshoot_recovery": 3 / 3,
                      "success_by_distance": {7: 1 / 2, 8: 0.0, 11: 1.0},
                      "own_samples": {"wrong_move": 4 / 4, "oracle_right": 14 / 24, "oracle_up": 10 / 24}}


def test_the_task_limits_let_the_longest_walk_finish_with_notes(tokenizer):
    """The farthest goal with both detours: MAX_MOVES turns, each a move with its note (max_turn_tokens)."""
    assert TASKS["walk_env"].conversations.max_turns == MAX_MOVES
    walk = ["L", "D"] + ["R"] * 8 + ["U"] * 8
    assert len(walk) == MAX_MOVES
    conversation = played(tokenizer, {"reward_model": {"ground_truth": "1 1 8 8"}}, [m + "45" for m in walk])
    assert len(tokenizer.encode("R45", add_special_tokens=False)) + 1 == LIMITS.max_turn_tokens
    assert (conversation.ending, conversation.reward, conversation.turns) == ("done", 1.0, MAX_MOVES)
    assert len(conversation.response_ids) <= TASKS["walk_env"].response_tokens
