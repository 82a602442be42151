"""An embedded walk-to-goal task where a slip can be recovered from (the arithmetic task's slips are fatal).

On a GRID x GRID board, walk from a start to a goal up and to the right with the moves U R D L, e.g. the
question "walk 2 3 -> 7 8 :". Each move is written with what remains of the way after it (goal minus
position, x then y, a signed digit each): "R45 U44 R34 ...". With d the distance (6..14), a walk succeeds
when it reaches the goal within d + SLACK moves without leaving the board; it is shortest when it reaches
the goal in exactly d moves and stops there. A wrong move costs two of the SLACK moves, so a walker that
steers back after a slip succeeds. Rows are in verl's schema; the ground truth is "x0 y0 x1 y1".

Why the notes: a tiny model must otherwise count its moves to know where it is, and the 4-layer teacher did
not learn that in 1000 steps (success 0.10-0.15, loss flat). With them each move is one-digit arithmetic, as
in the arithmetic task, and a slip still leads somewhere a teacher's own walks never go: a wrong move makes a
remaining distance grow, which no shortest walk shows. Written without spaces, a move is 3 tokens under
Qwen2's pre-tokenizer (one token per digit).

`perturbed_walk` gives the teacher's training walks: oracle walks with random wrong moves, each marked as a
detour so that its loss can be masked out (its note is kept) — the teacher then learns to get back on course
from any position while its own samples never show a detour.
"""
import random
import re
from typing import Callable, Collection, Iterator, Optional

from megatron_opd.data.schema import make_row

GRID = 10
MOVES = {"U": (0, 1), "R": (1, 0), "D": (0, -1), "L": (-1, 0)}
SLACK = 4
DISTANCES = range(6, 15)
WALK_DATA_SOURCE = "synthetic_walk"
INSTRUCTION = "Moves U R D L, each with the x and y left."
_WORD = re.compile(r"([URDL])(?:-?\d-?\d)?")


def walk_problem(rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, goal): the goal up and to the right of the start at a distance in DISTANCES, both on the board."""
    distance = rng.choice(DISTANCES)
    dx = rng.randint(max(0, distance - (GRID - 1)), min(distance, GRID - 1))
    dy = distance - dx
    start = (rng.randint(0, GRID - 1 - dx), rng.randint(0, GRID - 1 - dy))
    return start, (start[0] + dx, start[1] + dy)


def question(start, goal) -> str:
    return f"walk {start[0]} {start[1]} -> {goal[0]} {goal[1]} :"


def oracle_moves(rng: random.Random, start, goal) -> list[str]:
    """A shortest walk from any position on the board to the goal, its moves in random order."""
    dx, dy = goal[0] - start[0], goal[1] - start[1]
    moves = ["R" if dx > 0 else "L"] * abs(dx) + ["U" if dy > 0 else "D"] * abs(dy)
    rng.shuffle(moves)
    return moves


def next_position(position, move):
    return position[0] + MOVES[move][0], position[1] + MOVES[move][1]


def on_board(position) -> bool:
    return 0 <= position[0] < GRID and 0 <= position[1] < GRID


def distance(position, goal) -> int:
    return abs(goal[0] - position[0]) + abs(goal[1] - position[1])


def perturbed_walk(rng: random.Random, start, goal, detour_rate: float = 0.2, next_move: Optional[Callable] = None,
                   detours_from: str = "DL", overshoot_rate: float = 0.0) -> list[tuple[str, bool]]:
    """(move, is_detour) pairs: before each move, with probability `detour_rate` (at most SLACK // 2 times),
    a move of `detours_from` away from the goal that stays on the board; then the oracle's next move from
    where the walk is (`next_move(position, goal)`; by default a random shortest walk's first). Right after an
    oracle move that reaches the goal's column or row, with probability `overshoot_rate` (within the same
    SLACK // 2) that move once more, past it: the slip of a student that keeps going."""
    next_move = next_move or (lambda position, goal: oracle_moves(rng, position, goal)[0])
    walk, position, detours = [], start, 0

    def away(move) -> bool:
        return on_board(next_position(position, move)) and distance(next_position(position, move), goal) > distance(
            position, goal)

    while position != goal:
        if detours < SLACK // 2:
            previous = walk[-1][0] if walk and not walk[-1][1] else None
            if overshoot_rate and previous and away(previous) and rng.random() < overshoot_rate:
                choices = [previous]
            else:
                choices = [m for m in detours_from if away(m)] if rng.random() < detour_rate else []
            if choices:
                move = rng.choice(choices)
                walk.append((move, True))
                position, detours = next_position(position, move), detours + 1
                continue
        move = next_move(position, goal)
        walk.append((move, False))
        position = next_position(position, move)
    return walk


def walk_text(start, goal, moves: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The response for `moves`: each move and the remaining (dx, dy) after it; and each move's character span."""
    text, spans, position = "", [], start
    for move in moves:
        position = next_position(position, move)
        text += " " if text else ""
        spans.append((len(text), len(text) + 1))
        text += f"{move}{goal[0] - position[0]}{goal[1] - position[1]}"
    return text, spans


def parse_moves(text: str) -> Optional[list[str]]:
    """The moves of a response, or None when a word is not a move with an optional note ("R45", "L-10", "U")."""
    matches = [_WORD.fullmatch(word) for word in text.split()]
    return None if not all(matches) else [m.group(1) for m in matches]


def walk_outcome(start, goal, text: str) -> dict:
    """{"success", "shortest"} of a response: see the module docstring."""
    moves = parse_moves(text)
    distance = goal[0] - start[0] + goal[1] - start[1]
    position, reached = start, None
    for count, move in enumerate(moves or [], 1):
        position = next_position(position, move)
        if not on_board(position):
            break
        if position == goal:
            reached = count
            break
    success = reached is not None and reached <= distance + SLACK
    return {"success": success, "shortest": success and reached == distance == len(moves)}


def walk_slips(start, goal, text: str) -> dict:
    """{"wrong_move": a move that does not bring the walker closer to the goal, "wrong_note": a word that is not
    a move with the true remaining way after it} within the walk up to the goal (or its end)."""
    position, slips = start, {"wrong_move": False, "wrong_note": False}
    for word in text.split():
        match = _WORD.fullmatch(word)
        if not match:
            slips["wrong_note"] = True
            break
        before = abs(goal[0] - position[0]) + abs(goal[1] - position[1])
        position = next_position(position, match.group(1))
        slips["wrong_move"] |= abs(goal[0] - position[0]) + abs(goal[1] - position[1]) >= before
        slips["wrong_note"] |= word != f"{match.group(1)}{goal[0] - position[0]}{goal[1] - position[1]}"
        if position == goal:
            break
    return slips


def parse_ground_truth(ground_truth: str) -> tuple[tuple[int, int], tuple[int, int]]:
    x0, y0, x1, y1 = map(int, ground_truth.split())
    return (x0, y0), (x1, y1)


def score(response: str, ground_truth: str) -> float:
    """The walk's scorer (registered for WALK_DATA_SOURCE in setup.py): 1.0 when the response succeeds."""
    return float(walk_outcome(*parse_ground_truth(ground_truth), response)["success"])


def walk_rows(num_rows: int, seed: int = 0, split: str = "train", exclude: Collection[str] = ()) -> Iterator[dict]:
    """Rows in verl's schema with an oracle walk as the answer, the same for the same arguments; questions in
    `exclude` (another split's start/goal pairs) are drawn again."""
    rng = random.Random(f"walk-{seed}-{split}")
    index, draws = 0, 0
    while index < num_rows:
        start, goal = walk_problem(rng)
        draws += 1
        if question(start, goal) in exclude:
            if draws > 100 * num_rows:
                raise ValueError(f"excluding {len(exclude)} start/goal pairs leaves too few to draw {num_rows} rows")
            continue
        yield make_row(data_source=WALK_DATA_SOURCE, question=question(start, goal), instruction=INSTRUCTION,
                       ground_truth=f"{start[0]} {start[1]} {goal[0]} {goal[1]}", split=split, index=index,
                       answer=walk_text(start, goal, oracle_moves(rng, start, goal))[0], ability="planning")
        index += 1


def detour_walk_rows(num_rows: int, seed: int = 0, exclude: Collection[str] = (),
                     detour_rate: float = 0.2) -> Iterator[dict]:
    """The teacher's training rows: `perturbed_walk`s as the answer, with extra_info.detours the [start, end)
    character spans of the wrong moves (`data.response_skip_key=extra_info.detours` trains without them)."""
    rng = random.Random(f"walk-detours-{seed}")
    for row in walk_rows(num_rows, seed, "teacher", exclude):
        start, goal = parse_ground_truth(row["reward_model"]["ground_truth"])
        walk = perturbed_walk(rng, start, goal, detour_rate)
        text, spans = walk_text(start, goal, [move for move, _ in walk])
        row["extra_info"].update(answer=text, detours=[list(span) for span, (_, detour) in zip(spans, walk) if detour])
        yield row
