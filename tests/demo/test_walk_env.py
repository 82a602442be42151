"""The walk as a conversation: the environment keeps the position and answers each move with the way left;
the goal ends with reward 1, a move off the board, a turn that is not one move or a goal out of reach of the
budget with 0;
the same moves always get the same answers, and the reward agrees with the single-turn task's scorer."""
import random

import pytest

from megatron_opd.demo.walk import SLACK, parse_ground_truth, score, walk_rows
from megatron_opd.demo.walk_env import WalkEnvironment


def walk_row(ground_truth: str) -> dict:
    return {"prompt": [{"role": "user", "content": "walk"}], "reward_model": {"style": "rule",
                                                                              "ground_truth": ground_truth}}


def play(row, turns):
    """The first messages and each observation, up to the one that ends the walk."""
    env = WalkEnvironment()
    observations = [env.start(row)]
    for turn in turns:
        observations.append(env.step(turn))
        if observations[-1].done:
            break
    return observations


def texts(observation):
    return [message["content"] for message in observation.messages]


def test_a_scripted_walk_reaches_the_goal_with_reward_1():
    first, *steps = play(walk_row("2 3 4 5"), ["R", "U44", "R", "U"])
    assert first == [{"role": "user", "content": "walk 2 3 -> 4 5 : One move per turn: U R D L."}]
    assert [texts(o) for o in steps] == [["at 3 3, left 1 2"], ["at 3 4, left 1 1"], ["at 4 4, left 0 1"],
                                         ["at the goal 4 5"]]
    assert [(o.reward, o.done) for o in steps] == [(0.0, False)] * 3 + [(1.0, True)]
    assert [o.info for o in steps][-1] == {"outcome": "goal", "moves": 4}
    assert all(message["role"] == "user" for o in steps for message in o.messages)


@pytest.mark.parametrize("turns, outcome, last", [
    (["L"], "off_board", "off the board at -1 0: the walk is over"),
    (["U", "L"], "off_board", "off the board at -1 1: the walk is over"),
    (["R U"], "bad_format", "not one move: the walk is over"),
    (["go right"], "bad_format", "not one move: the walk is over"),
    ([""], "bad_format", "not one move: the walk is over"),
    (["U", "D"] * 5, "out_of_reach", "at 0 0, the goal is out of reach: the walk is over"),
    (["R"] * 6, "out_of_reach", "at 6 0, the goal is out of reach: the walk is over"),
])
def test_a_failed_walk_ends_with_reward_0(turns, outcome, last):
    *_, end = play(walk_row("0 0 3 3"), turns)
    assert (end.reward, end.done, end.info["outcome"], texts(end)) == (0.0, True, outcome, [last])


def test_the_walk_ends_on_the_move_that_puts_the_goal_out_of_reach():
    ends = [len(play(walk_row("0 0 3 3"), turns)) - 1 for turns in (["U", "D"] * 5, ["R"] * 8, ["L"] * 3)]
    assert ends == [6, 6, 1]  # 4 moves left, 6 to go; two past the goal's column is in reach, three is not


def test_the_goal_on_the_last_move_of_the_budget_still_counts():
    turns = ["U", "D", "U", "D"] + ["R", "R", "R", "U", "U", "U"]  # 4 wasted + 6 = distance + SLACK
    assert len(turns) == 6 + SLACK
    *_, end = play(walk_row("0 0 3 3"), turns)
    assert (end.reward, end.done, end.info) == (1.0, True, {"outcome": "goal", "moves": 10})


def test_the_same_moves_get_the_same_answers_and_the_single_turn_reward():
    rng = random.Random(0)
    for row in walk_rows(10, seed=3):
        (x0, y0), (x1, y1) = parse_ground_truth(row["reward_model"]["ground_truth"])
        oracle = [word[0] for word in row["extra_info"]["answer"].split()]
        for walk in oracle, [rng.choice("URDL") for _ in range(x1 - x0 + y1 - y0 + SLACK)]:
            first, *steps = play(row, walk)
            assert [first, *steps] == play(row, walk)
            played = " ".join(walk[:len(steps)])
            assert steps[-1].done and steps[-1].reward == score(played, row["reward_model"]["ground_truth"])
            assert steps[-1].reward == 1.0 or walk is not oracle


def test_a_row_without_a_walk_ground_truth_is_refused_by_name():
    with pytest.raises(ValueError, match=r"reward_model.ground_truth='72': the walk needs \"x0 y0 x1 y1\""):
        WalkEnvironment().start(walk_row("72"))
