"""The walk-to-goal task (megatron_opd/demo/walk.py) as a conversation: the environment keeps the position.

Each turn the student writes one move (U R D L, a note after it such as "R45" is allowed and not read); the
environment answers with where the walker stands and the way left to the goal, e.g. "at 3 4, left 4 4". The
conversation ends with reward 1 at the goal, and with reward 0 on a turn that is not one move, a move off the
board, or as soon as the goal is farther than the single-turn task's budget (distance + SLACK moves) has moves
left. Ending a doomed walk at once, rather than when its budget is spent, keeps the conversation to states from
which the goal can still be reached: a walker three past the goal's column has no way back in budget, and
turns played there would only teach moves that cannot matter."""
from megatron_opd.demo.walk import SLACK, next_position, on_board, parse_ground_truth, parse_moves, question
from megatron_opd.rollout.envs.base import Environment, Observation, row_ground_truth

TURN_INSTRUCTION = "One move per turn: U R D L."


class WalkEnvironment(Environment):
    """rollout.env=walk; rows are the walk task's (reward_model.ground_truth "x0 y0 x1 y1")."""

    def start(self, row: dict) -> list[dict]:
        truth = row_ground_truth(row)
        try:
            self.position, self.goal = parse_ground_truth(truth)
        except (AttributeError, ValueError):
            raise ValueError(f"reward_model.ground_truth={truth!r}: the walk needs \"x0 y0 x1 y1\" "
                             f"(rows from megatron_opd.demo.walk.walk_rows)") from None
        self.moves = 0
        self.max_moves = self.goal[0] - self.position[0] + self.goal[1] - self.position[1] + SLACK
        # The row's own prompt asks for the whole walk in one answer, which this conversation counts as a
        # bad turn: the question is asked again with the one-move-per-turn rule.
        return [{"role": "user", "content": f"{question(self.position, self.goal)} {TURN_INSTRUCTION}"}]

    def step(self, assistant_text: str) -> Observation:
        moves = parse_moves(assistant_text)
        if moves is None or len(moves) != 1:
            return self._end("bad_format", "not one move: the walk is over")
        self.moves += 1
        self.position = next_position(self.position, moves[0])
        x, y = self.position
        if not on_board(self.position):
            return self._end("off_board", f"off the board at {x} {y}: the walk is over")
        if self.position == self.goal:
            return self._end("goal", f"at the goal {x} {y}", reward=1.0)
        left_x, left_y = self.goal[0] - x, self.goal[1] - y
        if abs(left_x) + abs(left_y) > self.max_moves - self.moves:
            return self._end("out_of_reach", f"at {x} {y}, the goal is out of reach: the walk is over")
        return Observation(messages=[_user(f"at {x} {y}, left {left_x} {left_y}")], info=self._info("moved"))

    def _end(self, outcome: str, text: str, reward: float = 0.0) -> Observation:
        return Observation(messages=[_user(text)], reward=reward, done=True, info=self._info(outcome))

    def _info(self, outcome: str) -> dict:
        return {"outcome": outcome, "moves": self.moves}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}
