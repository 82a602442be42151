"""The walk-to-goal task: problems on the board at the stated distances, oracle walks succeed and are shortest,
perturbed walks recover within the slack with their detours marked, the scorer's edges, held-out rows."""
import random

from megatron_opd.data.scorers import mean_score
from megatron_opd.demo.walk import (
    DISTANCES, GRID, SLACK, WALK_DATA_SOURCE, detour_walk_rows, distance, next_position, oracle_moves,
    parse_ground_truth, perturbed_walk, parse_moves, question, walk_outcome, walk_problem, walk_rows, walk_slips, walk_text)


def test_problems_lie_on_the_board_up_and_right_at_every_distance():
    rng = random.Random(0)
    problems = [walk_problem(rng) for _ in range(3000)]
    seen = set()
    for (x0, y0), (x1, y1) in problems:
        assert all(0 <= v < GRID for v in (x0, y0, x1, y1)) and x1 >= x0 and y1 >= y0
        seen.add(x1 - x0 + y1 - y0)
    assert seen == set(DISTANCES)


def test_oracle_walks_succeed_shortest_and_extra_moves_cost_shortest_only():
    rng = random.Random(1)
    for _ in range(200):
        start, goal = walk_problem(rng)
        moves = oracle_moves(rng, start, goal)
        assert walk_outcome(start, goal, walk_text(start, goal, moves)[0]) == {"success": True, "shortest": True}
        assert walk_outcome(start, goal, walk_text(start, goal, moves + ["U"])[0]) == {"success": True,
                                                                                       "shortest": False}


def test_perturbed_walks_recover_within_the_slack_with_detours_marked():
    rng = random.Random(2)
    detoured = 0
    for _ in range(300):
        start, goal = walk_problem(rng)
        walk = perturbed_walk(rng, start, goal, detour_rate=0.5)
        detours = [move for move, is_detour in walk if is_detour]
        distance = goal[0] - start[0] + goal[1] - start[1]
        assert len(detours) <= SLACK // 2 and set(detours) <= {"D", "L"}
        assert len(walk) == distance + 2 * len(detours)
        outcome = walk_outcome(start, goal, " ".join(move for move, _ in walk))
        assert outcome == {"success": True, "shortest": not detours}
        detoured += bool(detours)
    assert detoured > 150


def test_an_overshoot_repeats_the_move_that_reached_the_goals_column_or_row():
    rng, overshot = random.Random(3), 0
    for _ in range(300):
        start, goal = walk_problem(rng)
        walk = perturbed_walk(rng, start, goal, detour_rate=0.0, overshoot_rate=1.0)
        position, moves = start, [move for move, _ in walk]
        for k, (move, is_detour) in enumerate(walk):
            after = next_position(position, move)
            assert is_detour == (distance(after, goal) > distance(position, goal))
            if is_detour:  # the oracle's move just before, which reached the goal's column or row, once more
                assert k and not walk[k - 1][1] and move == moves[k - 1]
                assert position[0] == goal[0] or position[1] == goal[1]
            position = after
        detours = sum(d for _, d in walk)
        assert detours <= SLACK // 2 and walk_outcome(start, goal, " ".join(moves))["success"]
        overshot += detours > 0
    assert overshot > 200


def test_the_scorer_fails_off_board_garbled_and_too_long_walks():
    start, goal = (0, 0), (3, 3)  # distance 6: success needs the goal within 10 moves
    assert not walk_outcome(start, goal, "L R R R U U U")["success"]  # leaves the board first
    assert not walk_outcome(start, goal, "R R R U U U #### 7")["success"]
    assert not walk_outcome(start, goal, "")["success"]
    assert not walk_outcome(start, goal, "R23 R1x R U U U")["success"]  # a note that is no number
    assert walk_outcome(start, goal, "R23 R13 R03 U02 U01 U00")["success"]
    assert walk_outcome(start, goal, "U D U D R R R U U U")["success"]  # 10 moves
    assert not walk_outcome(start, goal, "U D U D U D R R R U U U")["success"]  # 12 moves


def test_rows_are_reproducible_hold_out_a_split_and_answer_with_an_oracle_walk():
    test = list(walk_rows(100, seed=3, split="test"))
    held_out = {row["extra_info"]["question"] for row in test}
    train = list(walk_rows(500, seed=3, exclude=held_out))
    assert train == list(walk_rows(500, seed=3, exclude=held_out))
    assert not held_out & {row["extra_info"]["question"] for row in train}
    for row in train[:50]:
        start, goal = parse_ground_truth(row["reward_model"]["ground_truth"])
        assert row["extra_info"]["question"] == question(start, goal)
        assert walk_outcome(start, goal, row["extra_info"]["answer"]) == {"success": True, "shortest": True}


def test_detour_rows_mark_exactly_the_wrong_moves_and_the_rest_is_an_oracle_walk():
    marked = 0
    for row in detour_walk_rows(200, seed=3, detour_rate=0.3):
        answer, spans = row["extra_info"]["answer"], row["extra_info"]["detours"]
        start, goal = parse_ground_truth(row["reward_model"]["ground_truth"])
        assert all(answer[a:b] in ("D", "L") for a, b in spans) and walk_outcome(start, goal, answer)["success"]
        moves = parse_moves(answer)
        assert len(moves) == goal[0] - start[0] + goal[1] - start[1] + 2 * len(spans)
        marked += len(spans)
    assert marked > 50


def test_rows_are_scored_by_their_data_source():
    walk, arithmetic = (WALK_DATA_SOURCE, "synthetic_arithmetic")
    assert mean_score([walk, walk, arithmetic], ["R R R U U U", "R R R", "#### 7"], ["0 0 3 3"] * 2 + ["7"]) == 2 / 3


def test_each_move_is_followed_by_the_remaining_way():
    text, spans = walk_text((2, 3), (4, 4), ["R", "L", "R", "R", "R", "L", "U"])
    assert text == "R11 L21 R11 R01 R-11 L01 U00" and [text[a:b] for a, b in spans] == list("RLRRRLU")
    assert parse_moves(text) == list("RLRRRLU")


def test_slips_are_wrong_moves_and_wrong_notes():
    start, goal = (2, 3), (4, 4)
    assert walk_slips(start, goal, "R11 R01 U00") == {"wrong_move": False, "wrong_note": False}
    assert walk_slips(start, goal, "R11 L21 R11 R01 U00") == {"wrong_move": True, "wrong_note": False}
    assert walk_slips(start, goal, "R11 R11 U00") == {"wrong_move": False, "wrong_note": True}
    assert walk_slips(start, goal, "R11 R01 U00 D01") == {"wrong_move": False, "wrong_note": False}  # past the goal
