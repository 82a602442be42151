"""The comparison's held-out metrics of one checkpoint, by greedy decoding (transformers' generate, the same
for every arm):
- success: the task's own scorer (walk: the goal within d + SLACK moves; arithmetic: the GSM8K answer);
- walk only: shortest (exactly d moves: the criterion where recovering earns nothing), recovery (success
  after a forced first move away from the goal, the model writing the rest), success by distance d, and how
  often the model's own samples at the rollout temperature hold a wrong move or a wrong note (own_samples).
Run: .venv/bin/python -m megatron_opd.demo.evaluate MODEL_DIR TEST.parquet
"""
import sys

import pyarrow.parquet as pq
import torch

from megatron_opd.data.chat import render_prompts
from megatron_opd.data.scorers import score_response
from megatron_opd.demo.walk import GRID, MOVES, WALK_DATA_SOURCE, parse_ground_truth, walk_outcome, walk_slips
from megatron_opd.demo.jobs import TORCH_IN_PROCESS
from megatron_opd.demo.settings import TEMPERATURE

BATCH = 256


def decode(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
    """The greedy (or, at a temperature, sampled) continuation of each (already rendered) text, decoded."""
    tokenizer.padding_side = "left"
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature
                else dict(do_sample=False))
    out = []
    for first in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[first:first + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **sampling)
        out += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def forced_detour(start) -> str | None:
    """A first move away from the goal (which lies up and to the right) that stays on the board."""
    for move in ("L", "D"):
        x, y = start[0] + MOVES[move][0], start[1] + MOVES[move][1]
        if 0 <= x < GRID and 0 <= y < GRID:
            return move
    return None


def evaluate(model_dir: str, rows: list[dict], max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    with TORCH_IN_PROCESS:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = render_prompts(tokenizer, [row["prompt"] for row in rows])
    truths = [row["reward_model"]["ground_truth"] for row in rows]
    responses = decode(model, tokenizer, prompts, max_new_tokens)
    result = {"success": sum(score_response(row["data_source"], text, truth) for row, text, truth in
                             zip(rows, responses, truths)) / len(rows), "prompts": len(rows), "responses": responses}
    if rows[0]["data_source"] != WALK_DATA_SOURCE:
        return result
    problems = [parse_ground_truth(truth) for truth in truths]
    outcomes = [walk_outcome(start, goal, text) for (start, goal), text in zip(problems, responses)]
    result["shortest"] = sum(o["shortest"] for o in outcomes) / len(rows)
    by_distance = {}
    for (start, goal), outcome in zip(problems, outcomes):
        by_distance.setdefault(goal[0] - start[0] + goal[1] - start[1], []).append(outcome["success"])
    result["success_by_distance"] = {d: sum(v) / len(v) for d, v in sorted(by_distance.items())}
    forced = [(i, forced_detour(start)) for i, (start, _) in enumerate(problems) if forced_detour(start)]
    continued = decode(model, tokenizer, [prompts[i] + move for i, move in forced], max_new_tokens)
    result["recovery"] = sum(walk_outcome(*problems[i], move + text)["success"]
                             for (i, move), text in zip(forced, continued)) / len(forced)
    # The states the model's own samples visit (what on-policy training sees): a slip of each kind, how often.
    with TORCH_IN_PROCESS:  # the same draws whatever the other job threads do
        torch.manual_seed(0)
        sampled = decode(model, tokenizer, prompts, max_new_tokens, TEMPERATURE)
    slips = [walk_slips(start, goal, text) for (start, goal), text in zip(problems, sampled)]
    result["own_samples"] = {kind: sum(s[kind] for s in slips) / len(slips) for kind in ("wrong_move", "wrong_note")}
    return result


if __name__ == "__main__":
    print(evaluate(sys.argv[1], pq.read_table(sys.argv[2]).to_pylist(), 64))
