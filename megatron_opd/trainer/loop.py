"""The on-policy distillation loop (and its SFT mode) on megatron-core.

One step: a prompt batch -> student rollouts from the engine (global rank 0, broadcast) -> each DP rank's
share of the sequences, cut into CP chunks -> the co-located teacher's forward-only pass (same layout,
outputs kept sharded on the last stage) -> the student's forward-backward with the distillation loss,
`ppo_epochs` passes over `ppo_mini_batch_size` mini-batches, one optimizer step each -> the new weights
pushed to the engine.

A step's checkpoint (every `save_freq` steps, at an `exit_interval` step, on a preemption request, at the
end) is written before its metrics line, and holds that line, so the line survives whenever the
checkpoint does. An optimizer step whose gradients are not finite is refused, logged and counted.
"""
import itertools
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from megatron_opd.models.head import output_weight
from megatron_opd.rollout.engine import RolloutError
from megatron_opd.trainer import checkpoint
from megatron_opd.trainer.batch import build_batch, split_micro_batches
from megatron_opd.trainer.config import OPDConfig, divergence_temperature
from megatron_opd.trainer.objective import PARTS, sft_loss, student_loss
from megatron_opd.trainer.optim import optimizer_step
from megatron_opd.trainer.pipeline import student_pass
from megatron_opd.trainer.preemption import Preemption
from megatron_opd.trainer.setup import Run

TIMINGS = ("gen", "teacher", "update_actor", "sync", "step")


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _sum_shares(values: dict, dims) -> dict:
    """Sum per-rank metric shares over the DP x CP ranks of the last stage (TP ranks hold copies; one counts)
    to every rank."""
    names = sorted(_broadcast(sorted(values) if dims.rank == dims.world_size - 1 else None, src=dims.world_size - 1))
    vector = dims.tensor([float(values.get(n, 0.0)) if dims.counts_metrics else 0.0 for n in names], torch.float64)
    dist.all_reduce(vector)
    return dict(zip(names, vector.tolist()))


def on_policy_prompts(count: int, lmbda: float, seed: int, step: int) -> set[int]:
    """The prompts of a step (indices) that the student answers: round(lmbda x count), drawn anew each step."""
    if lmbda == 1:
        return set(range(count))
    return set(random.Random(seed * 1_000_003 + step).sample(range(count), round(lmbda * count)))


def _length_metrics(samples, key) -> dict:
    lengths = [len(sample[key]) for sample in samples]
    return {"response_length/mean": sum(lengths) / len(lengths), "response_length/max": max(lengths)}


def _part_means(summed: dict) -> dict:
    """The KL of each part's tokens (token-mean), from the summed per-part shares."""
    for part in PARTS:
        tokens, kl_sum = summed.pop(f"actor/tokens_{part}", 0.0), summed.pop(f"actor/kl_sum_{part}", 0.0)
        if tokens:
            summed[f"actor/kl_loss_{part}"] = kl_sum / tokens
    return summed


class Trainer:
    def __init__(self, cfg: OPDConfig):
        self.cfg = cfg
        self.run = Run(cfg)

    def rollouts(self, step: int, items: list[dict]):
        """Prompt+response token lists for this step, the same on every rank; which of them the student
        sampled (`actor.lmbda` of the prompts; the others keep their given response, `rollout.n` times); the
        given responses' loss masks (None: every token)."""
        cfg, run = self.cfg, self.run
        prompts = [item["input_ids"] for item in items]
        if cfg.trainer.mode == "sft":
            return ([(p, item["response_ids"]) for p, item in zip(prompts, items)], [False] * len(items),
                    [item.get("response_loss_mask") for item in items], _length_metrics(items, "response_ids"))
        own, n = on_policy_prompts(len(items), cfg.actor.lmbda, cfg.trainer.seed, step), cfg.rollout.n
        samples = None
        if run.dims.rank == 0:
            answered = [prompts[i] for i in sorted(own)]
            generated = iter(run.engine.generate(answered, run.sampling(step)) if answered else ())
            samples = []
            for i, item in enumerate(items):
                samples += ([(s.prompt_ids, s.response_ids) for s in itertools.islice(generated, n)] if i in own
                            else [(prompts[i], item["response_ids"])] * n)
            beyond = [t for _, response in samples for t in response if t >= run.vocab_size]
            if beyond:  # broadcast the error so that every rank stops with it
                samples = RolloutError(f"the engine sampled token id {beyond[0]}, past the {run.vocab_size} ids "
                                       f"the tokenizers share (a vocabulary padding row, no token)")
        samples = _broadcast(samples)
        if isinstance(samples, RolloutError):
            raise samples
        metrics = _length_metrics(samples, 1)
        if cfg.actor.lmbda < 1:
            metrics["rollout/on_policy_fraction"] = len(own) / len(items)
        masks = [None if i in own else item.get("response_loss_mask") for i, item in enumerate(items) for _ in range(n)]
        return samples, [i in own for i in range(len(items)) for _ in range(n)], masks, metrics

    def _optimizer_step(self, mini: list, teacher: list) -> dict:
        """One optimizer step on a mini-batch (this rank's micro-batches); its global metrics."""
        from megatron_opd.loss import response_counts

        cfg, run, dims = self.cfg, self.run, self.run.dims
        counts = response_counts([mb.loss_mask for mb in mini], dp_group=dims.dp_group, cp_group=dims.cp_group)
        weight = output_weight(run.student[-1]) if dims.is_last_stage else None  # [V/TP, H], tied or not

        def share(index, hidden, mb):
            if cfg.trainer.mode == "sft":
                return sft_loss(hidden, weight, mb.labels, mb.loss_mask, run.vocab_size, dims.tp_group, counts, index,
                                cfg.actor.loss_agg_mode)
            return student_loss(hidden, weight, mb.labels, mb.loss_mask, teacher[index], run.teacher.head_weight,
                                cfg.actor, divergence_temperature(cfg), run.vocab_size, dims.tp_group, counts, index,
                                mb.on_policy if cfg.actor.lmbda < 1 else None)

        for chunk in run.ddp:
            chunk.zero_grad_buffer()
        run.optimizer.zero_grad()
        results = student_pass(run.ddp, mini, share, scale=len(mini) * dims.dp_size, cp_size=dims.cp_size)
        outcome = optimizer_step(run.optimizer, cfg.actor.grad_clip)
        if outcome.applied:
            run.scheduler.step(increment=1)
        shares = {}
        for result in results:
            for name, value in result.items():
                shares[name] = shares.get(name, 0.0) + float(value)
        return {**_part_means(_sum_shares(shares, dims)), "actor/grad_norm": outcome.grad_norm,
                "actor/skipped_updates": 0.0 if outcome.applied else 1.0}

    def update(self, samples, batch) -> tuple[dict, float]:
        """Teacher pass, then every mini-batch of every epoch; averaged metrics and the teacher's seconds."""
        cfg, run, dims = self.cfg, self.run, self.run.dims
        rows = batch.size // dims.dp_size // run.mini_batches_per_step
        first = dims.dp_rank * rows * run.mini_batches_per_step
        minis, micro = [], []
        for m in range(run.mini_batches_per_step):  # micro-batches are cut to length before the CP split
            mini = split_micro_batches(batch.rows(first + m * rows, first + (m + 1) * rows), cfg.actor.micro_batch_size,
                                       cfg.actor.max_tokens_per_micro_batch, cfg.parallel.sequence_multiple)
            minis.append(slice(len(micro), len(micro) + len(mini)))
            micro += [mb.context_shard(dims.cp_rank, dims.cp_size) for mb in mini]
        started = time.perf_counter()
        teacher = run.teacher.outputs(samples, batch, micro) if run.teacher is not None else [None] * len(micro)
        teacher_s = time.perf_counter() - started
        updates = [self._optimizer_step(micro[part], teacher[part])
                   for _ in range(cfg.actor.ppo_epochs) for part in minis]
        names = sorted({name for u in updates for name in u})  # a part can be missing from a mini-batch
        metrics = {name: sum(values) / len(values) for name in names
                   for values in [[u[name] for u in updates if name in u]]}
        metrics["actor/skipped_updates"] = sum(u["actor/skipped_updates"] for u in updates)
        metrics["actor/lr"] = run.optimizer.param_groups[0]["lr"]
        if run.teacher is not None:
            metrics["teacher/bytes_moved_per_token"] = run.teacher.bytes_per_token(batch)
        return metrics, teacher_s

    def validate(self) -> dict:
        run = self.run
        accuracy = None
        if run.dims.rank == 0:
            accuracy = run.validate()
        return {"val/accuracy": _broadcast(accuracy)}

    def _report_skipped(self, step: int, metrics: dict) -> None:
        skipped = metrics["actor/skipped_updates"]
        self.run.skipped_updates += int(skipped)
        metrics["trainer/skipped_updates_total"] = float(self.run.skipped_updates)
        if skipped and self.run.dims.rank == 0:
            print(f"step {step}: {int(skipped)} optimizer update(s) refused: gradient norm "
                  f"{metrics['actor/grad_norm']} is not finite ({self.run.skipped_updates} refused so far)",
                  file=sys.stderr, flush=True)

    def _checkpoint_due(self, step: int, stopping: bool) -> bool:
        t = self.cfg.trainer
        return stopping or step == t.total_steps or bool(t.save_freq and step % t.save_freq == 0)

    def _step(self, step: int) -> dict:
        """Steps `step` -> `step + 1`; its metrics."""
        cfg, run = self.cfg, self.run
        started = time.perf_counter()
        samples, on_policy, masks, metrics = self.rollouts(step, run.next_items())
        gen_s = time.perf_counter() - started
        batch = build_batch([p for p, _ in samples], [r for _, r in samples], run.pad_id, run.dims.device,
                            cfg.parallel.sequence_multiple, on_policy, masks)
        if run.engine is not None:  # a colocated SGLang server frees its GPU memory for the update
            run.engine.sleep()
        update_started = time.perf_counter()
        update_metrics, teacher_s = self.update(samples, batch)
        update_s = time.perf_counter() - update_started - teacher_s
        sync_started = time.perf_counter()
        run.sync_engine(step + 1)
        if run.engine is not None:
            run.engine.wake_up()
        sync_s = time.perf_counter() - sync_started
        metrics.update(update_metrics)
        if cfg.trainer.mode == "distill":
            metrics["actor/distillation_mode"] = 1.0
        step_s = time.perf_counter() - started
        metrics.update({f"timing_s/{k}": v for k, v in zip(TIMINGS, (gen_s, teacher_s, update_s, sync_s, step_s))})
        metrics["perf/tokens_per_s"] = int(batch.loss_mask.numel()) / step_s
        self._report_skipped(step + 1, metrics)
        if cfg.trainer.test_freq and (step + 1) % cfg.trainer.test_freq == 0:
            metrics.update(self.validate())
        return metrics

    def train(self) -> list[dict]:
        cfg, run = self.cfg, self.run
        history = []
        preemption = Preemption()
        try:
            step = run.start_step
            run.sync_engine(step)
            if cfg.trainer.test_freq and step == 0:
                run.log(0, self.validate())
            while step < cfg.trainer.total_steps:
                metrics = self._step(step)
                step += 1
                preempted = step < cfg.trainer.total_steps and preemption.requested(run.dims.device)
                exiting = step < cfg.trainer.total_steps and cfg.trainer.exit_interval > 0 \
                    and step % cfg.trainer.exit_interval == 0
                stopping = preempted or exiting
                if self._checkpoint_due(step, stopping):
                    saved = checkpoint.save(cfg.trainer.save_dir, step, run.ddp, run.optimizer, run.scheduler,
                                            {"sampler": run.sampler.state_dict(), "metrics": metrics,
                                             "skipped_updates": run.skipped_updates}, run.dims)
                run.log(step, metrics)
                history.append({"step": step, **metrics})
                if preempted:  # after the step's metrics line: the resumed run starts at the next step
                    preemption.saved(step, saved)
                if stopping:
                    if exiting and not preempted and run.dims.rank == 0:
                        print(f"trainer.exit_interval={cfg.trainer.exit_interval}: checkpoint {saved} saved after "
                              f"step {step}; stopping (trainer.resume=auto continues from there)",
                              file=sys.stderr, flush=True)
                    break
            if cfg.trainer.export_hf and step == cfg.trainer.total_steps:
                run.export_hf(os.path.join(cfg.trainer.save_dir, "hf"))
        finally:
            run.close()
            preemption.close()
        return history
