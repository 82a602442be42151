"""A step's sequences: the student's own samples from the engine (global rank 0, broadcast), one response
each or, with rollout.env, a conversation whose environment tokens carry no loss; or the given responses of
the prompts it does not answer (actor.lmbda < 1, SFT mode). With the engine's log-prob of each sampled token
(actor.policy_loss=pg) and, when `reward.fn` is set or an environment answers, each sample's task reward."""
import itertools
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.atomic import write_text
from megatron_opd.config import run_teachers
from megatron_opd.data.scorers import NO_REWARD, reward_function
from megatron_opd.loss.kinds import FULL_KINDS
from megatron_opd.loss.policy_gradient import group_advantages
from megatron_opd.models.batch import TokenBatch, build_batch
from megatron_opd.rollout.conversation import conversation_metrics
from megatron_opd.rollout.engine import RolloutError
from megatron_opd.trainer.objective import engine_logprobs_read


@dataclass
class StepSamples:
    pairs: list  # (prompt ids, response ids) per sequence, rollout.n consecutive sequences per prompt
    on_policy: list  # per sequence: the student sampled it
    loss_masks: list  # per sequence: a 0/1 list over its response tokens, or None (every token)
    engine_logprobs: list  # per sequence: the engine's log-prob of each response token (pg), or None
    rewards: Optional[list]  # per sequence, with reward.fn set: its task reward
    reward_advantages: Optional[list]  # per sequence, with reward.fn set: its reward minus its prompt's mean
    metrics: dict
    teacher_index: Optional[list] = None  # per sequence, with several teachers: its teacher's, by data source
    cross: Optional[dict] = None  # teacher name -> its CrossView (trainer/cross_rows.py), teachers of another tokenizer
    versions: Optional[list] = None  # per sequence, rollout.max_staleness > 0: the weights' version it was drawn with

    def batch(self, pad_id: int, device, multiple: int) -> TokenBatch:
        return build_batch([p for p, _ in self.pairs], [r for _, r in self.pairs], pad_id, device, multiple,
                           self.on_policy, self.loss_masks, self.engine_logprobs, self.reward_advantages,
                           self.teacher_index)


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_policy_prompts(count: int, lmbda: float, seed: int, step: int) -> set[int]:
    """The prompts of a step (indices) that the student answers: round(lmbda x count), drawn anew each step."""
    if lmbda == 1:
        return set(range(count))
    return set(random.Random(seed * 1_000_003 + step).sample(range(count), round(lmbda * count)))


def length_metrics(responses) -> dict:
    lengths = [len(response) for response in responses]
    return {"response_length/mean": sum(lengths) / len(lengths), "response_length/max": max(lengths)}


def rewards_of(fn: str, items: list[dict], responses: list[str], n: int) -> list[float]:
    """Each response's reward (reward.fn `fn`); responses are `n` consecutive per item."""
    score = reward_function(fn)
    return [float(score(item["data_source"], text, item["ground_truth"]))
            for item, texts in zip(items, itertools.batched(responses, n)) for text in texts]


def given_responses(items: list[dict]) -> StepSamples:
    """SFT: the given response of each prompt."""
    return StepSamples([(item["input_ids"], item["response_ids"]) for item in items], [False] * len(items),
                       [item.get("response_loss_mask") for item in items], [None] * len(items), None, None,
                       length_metrics(item["response_ids"] for item in items))


def generate(run, cfg, step: int, items: list[dict]):
    """Rank 0: (pairs, engine log-probs, loss masks, rewards, rollout metrics, weight versions) of a step's items
    or the RolloutError every rank raises; run now, or ahead of its step (trainer/prefetch.py)."""
    return _generate(run, cfg, step, items, on_policy_prompts(len(items), cfg.actor.lmbda, cfg.trainer.seed, step))


def _generate(run, cfg, step: int, items: list[dict], own: set[int]):
    """Rank 0: (pairs, engine log-probs, loss masks, rewards, rollout metrics, weight versions) or the RolloutError
    every rank raises. With rollout.env the student's sequences are conversations (rollout/conversation.py)."""
    n, version = cfg.rollout.n, run.engine.weight_version
    keep_logprobs = engine_logprobs_read(cfg.actor, cfg.rollout.max_staleness > 0)
    answered = [items[i] for i in sorted(own)]
    metrics, conversations = {}, None
    if run.multi_turn is not None:
        conversations = run.multi_turn.roll_out(run.engine, answered, run.sampling(step)) if answered else []
        metrics = conversation_metrics(conversations) if conversations else {}
        generated = iter(conversations)
    else:
        generated = iter(run.engine.generate([item["input_ids"] for item in answered], run.sampling(step))
                         if answered else ())
    pairs, logprobs, masks, env_rewards = [], [], [], []
    for i, item in enumerate(items):
        if i in own:
            samples = list(itertools.islice(generated, n))
            pairs += [(s.prompt_ids, s.response_ids) for s in samples]
            # broadcast only where the loss reads them (trainer/objective.engine_logprobs_read)
            logprobs += [s.logprobs if keep_logprobs else None for s in samples]
            masks += [s.loss_mask if conversations is not None else None for s in samples]
            env_rewards += [s.reward if conversations is not None else 0.0 for s in samples]
        else:
            pairs += [(item["input_ids"], item["response_ids"])] * n
            logprobs += [None] * n
            masks += [item.get("response_loss_mask")] * n
            env_rewards += [0.0] * n
    beyond = [t for _, response in pairs for t in response if t >= run.vocab_size]
    if beyond:
        return RolloutError(f"the engine sampled token id {beyond[0]}, past the {run.vocab_size} ids the tokenizers "
                            f"share (a vocabulary padding row, no token)")
    rewards = None
    if conversations is not None:
        rewards = env_rewards
    elif cfg.reward.fn != NO_REWARD:
        texts = run.tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
        rewards = rewards_of(cfg.reward.fn, items, texts, n)
    versions = [version if i in own else None for i in range(len(items)) for _ in range(n)]
    return pairs, logprobs, masks, rewards, metrics, versions


def step_samples(run, cfg, step: int, items: list[dict], generated=None) -> StepSamples:
    """Collective: the step's sequences, the same on every rank. `generated`: on rank 0, what `generate` made of
    the items ahead of the step (rollout.max_staleness > 0); None: generated now."""
    if cfg.trainer.mode == "sft":
        return given_responses(items)
    own = on_policy_prompts(len(items), cfg.actor.lmbda, cfg.trainer.seed, step)
    if run.dims.rank == 0 and generated is None:
        generated = _generate(run, cfg, step, items, own)
    generated = broadcast(generated if run.dims.rank == 0 else None)
    if isinstance(generated, RolloutError):
        raise generated
    pairs, logprobs, masks, rewards, rollout_metrics, versions = generated
    n = cfg.rollout.n
    metrics = {**length_metrics(r for _, r in pairs), **rollout_metrics}
    if cfg.rollout.max_staleness:
        lags = [step - v for v in versions if v is not None]
        metrics.update({"rollout/staleness_mean": sum(lags) / len(lags), "rollout/staleness_max": float(max(lags))}
                       if lags else {})
    else:
        versions = None
    if cfg.actor.lmbda < 1:
        metrics["rollout/on_policy_fraction"] = len(own) / len(items)
    advantages = None
    if rewards is not None:
        metrics["reward/mean"] = sum(rewards) / len(rewards)
    if cfg.reward.fn != NO_REWARD:
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64, device=run.dims.device), n).tolist()
    teachers = None if run.routing is None else [run.routing.index_of(item["data_source"]) for item in items
                                                 for _ in range(n)]
    cross = None
    if run.cross:
        names = list(run_teachers(cfg))
        owners = [names[t] for t in teachers] if teachers is not None else [names[0]] * len(pairs)
        cross, cross_metrics = broadcast(_cross_views(run, items, pairs, logprobs, n, owners) if run.dims.rank == 0
                                         else None)
        metrics.update(cross_metrics)
        masks = _aligned_only(masks, pairs, cross, cfg.actor.kl_loss_type in FULL_KINDS, owners)
    return StepSamples(pairs, [i in own for i in range(len(items)) for _ in range(n)], masks, logprobs, rewards,
                       advantages, metrics, teachers, cross, versions)


def _cross_views(run, items: list[dict], pairs: list, logprobs: list, n: int, owners: list) -> tuple[dict, dict]:
    """Rank 0: each cross teacher's view of the step's sequences and the xtok/* metrics of its own (`owners`: each
    sequence's teacher; with several teachers the metrics are xtok/<name>/*); where the pg form keeps the
    student's own log-probs, they split each span's teacher value over its tokens."""
    prompts = [item["raw_prompt"] for item in items for _ in range(n)]
    views, metrics = {}, {}
    for name, tokens in run.cross.items():
        views[name], own = tokens.view(prompts, pairs, logprobs, [owner == name for owner in owners])
        metrics.update({f"xtok/{name}/{key.removeprefix('xtok/')}" if run.routing is not None else key: value
                        for key, value in own.items()})
    return views, metrics


def _aligned_only(masks: list, pairs: list, cross: dict, one_to_one: bool, owners: list) -> list:
    """No loss on a response's tokens past those its teacher, of another tokenizer, has values for (from a special
    token inside it or a byte that starts no character on); `one_to_one` (full kinds): none but on tokens that are
    a span alone on both sides, where both models' next-token distributions follow the same text. A sequence of a
    teacher of the student's tokenizer keeps its mask."""
    out = []
    for k, (mask, (_, response)) in enumerate(zip(masks, pairs)):
        view = cross.get(owners[k])
        if view is None:
            out.append(mask)
            continue
        keep = set(range(view.aligned[k]))
        if one_to_one:
            keep &= {student for student, _ in view.one_to_one[k]}
        if len(keep) < len(response):
            mask = [m if j in keep else 0.0 for j, m in enumerate(mask or [1.0] * len(response))]
        out.append(mask)
    return out


def dump_rollouts(directory: str, step: int, samples: StepSamples, tokenizer) -> None:
    """trainer.rollout_data_dir: the sequences step `step` trains on, one JSON line each, in <directory>/<step>.jsonl
    (the prompt's and response's ids and text, its loss mask over the response (null: every token; 0 on a
    conversation's environment tokens), whether the student sampled it, its reward and advantage; with
    rollout.max_staleness > 0 the version of the weights it was drawn with)."""
    prompts = tokenizer.batch_decode([p for p, _ in samples.pairs], skip_special_tokens=False)
    responses = tokenizer.batch_decode([r for _, r in samples.pairs], skip_special_tokens=False)
    lines = []
    for k, ((prompt_ids, response_ids), prompt, response) in enumerate(zip(samples.pairs, prompts, responses)):
        lines.append(json.dumps({
            "step": step, "sequence": k, "prompt_ids": list(prompt_ids), "response_ids": list(response_ids),
            "prompt": prompt, "response": response, "loss_mask": samples.loss_masks[k],
            "on_policy": samples.on_policy[k],
            "reward": samples.rewards[k] if samples.rewards is not None else None,
            "reward_advantage": samples.reward_advantages[k] if samples.reward_advantages is not None else None,
            **({"weight_version": samples.versions[k]} if samples.versions is not None else {})}))
    os.makedirs(directory, exist_ok=True)
    write_text(os.path.join(directory, f"{step}.jsonl"), "".join(line + "\n" for line in lines))
