"""A test environment that answers any turn: it counts the turns down from TURNS, so a random tiny student's
conversations have several turns and environment tokens whatever it writes. Used as
rollout.env=tests.rollout.envs.countdown:CountdownEnvironment."""
from megatron_opd.rollout.envs.base import Environment, Observation

TURNS = 2


class CountdownEnvironment(Environment):
    def start(self, row: dict) -> list[dict]:
        self.left, self.written = TURNS, 0
        return [{"role": "user", "content": f"count down from {TURNS}: {row['prompt'][-1]['content'][:20]}"}]

    def step(self, assistant_text: str) -> Observation:
        self.left -= 1
        self.written += len(assistant_text)
        if not self.left:  # a reward that varies with what the student wrote, for the policy-gradient form
            return Observation(messages=[], reward=(self.written % 5) / 4, done=True)
        return Observation(messages=[{"role": "user", "content": f"{self.left} left"}])
