"""Guess a number from 1 to 100, told "higher" or "lower" after each guess.
Run: python -m megatron_opd.train ... rollout.env=examples.envs.guess_number:GuessNumber rollout.max_turns=7"""
import random
import re

from megatron_opd.rollout.envs import Environment, Observation


class GuessNumber(Environment):
    def start(self, row):  # a verl-schema row; one fresh instance per conversation
        self.secret = random.Random(row["extra_info"]["index"]).randint(1, 100)
        return [{"role": "user", "content": "I picked a number from 1 to 100. One guess per turn."}]

    def step(self, assistant_text):
        guesses = re.findall(r"\d+", assistant_text)
        if not guesses:
            return Observation([], reward=0.0, done=True)  # no guess: the conversation ends, unrewarded
        guess = int(guesses[-1])
        if guess == self.secret:
            return Observation([], reward=1.0, done=True)
        hint = "higher" if guess < self.secret else "lower"
        return Observation([{"role": "user", "content": f"{guess}: {hint}."}])
