"""The walk-to-goal task: problems on the board at the stated distances, oracle walks succeed and are shortest,
perturbed walks recover within the slack with their detours marked, the scorer's edges, held-out rows."""
import random

from megatron_opd.data.walk import (
    DISTANCES, GRID, SLACK, oracle_moves, parse_ground_truth, perturbed_walk, question, walk_outcome, walk_problem,
    walk_rows)


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
        assert walk_outcome(start, goal, " ".join(moves)) == {"success": True, "shortest": True}
        assert walk_outcome(start, goal, " ".join(moves + ["U"])) == {"success": True, "shortest": False}


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


def test_the_scorer_fails_off_board_garbled_and_too_long_walks():
    start, goal = (0, 0), (3, 3)  # distance 6: success needs the goal within 10 moves
    assert not walk_outcome(start, goal, "L R R R U U U")["success"]  # leaves the board first
    assert not walk_outcome(start, goal, "R R R U U U #### 7")["success"]
    assert not walk_outcome(start, goal, "")["success"]
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
