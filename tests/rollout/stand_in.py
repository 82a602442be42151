"""A stand-in for a rollout engine (named so: the real engines' conversations are in
test_conversation_engines.py), for tests of what the rollout makes of the turns an engine writes."""
from megatron_opd.rollout.engine import Sample


class StandInEngine:
    """A stand-in for an engine: in the k-th generate call every prompt gets the script's k-th turn (cut at
    max_new_tokens; finish "stop" when it ends with the stop token or one of the sampling's), log-prob -0.5 per
    token. It keeps what it was sent."""
    weight_version = 0

    def __init__(self, script: list[list[int]], stop_id: int):
        self.script, self.stop_id, self.sent, self.seeds = script, stop_id, [], []

    def generate(self, prompts, sampling):
        turn = self.script[len(self.sent)]
        self.sent.append([list(p) for p in prompts])
        self.seeds.append(sampling.seed)
        ids = turn[:sampling.max_new_tokens]
        stopped = bool(ids) and ids[-1] in {self.stop_id, *sampling.stop_token_ids}
        return [Sample(list(p), list(ids), [-0.5] * len(ids), "stop" if stopped else "length", 0) for p in prompts]
