"""A task reward for the tests (`reward.fn=tests.trainer.rewards:letter_share`, the trainer run from the repo
root): the share of a response's characters that are letters, which a tiny random student's samples earn in
different amounts, so a group's samples get different rewards and the reward reaches the gradient."""


def letter_share(data_source: str, solution_str: str, ground_truth: str) -> float:
    return sum(c.isalpha() for c in solution_str) / max(len(solution_str), 1)
