"""The on-policy distillation loop (and its SFT mode) on megatron-core.

One step: a prompt batch -> student rollouts from the engine (global rank 0, broadcast) -> each DP rank's
share of the sequences, cut into CP chunks -> the co-located teacher's forward-only pass (same layout,
outputs kept sharded on the last stage) -> the student's forward-backward with the distillation loss (the
divergence itself, or its policy-gradient form with pi_old from a forward-only pass when a step has more
than one update), `ppo_epochs` passes over `ppo_mini_batch_size` mini-batches, one optimizer step each ->
the new weights pushed to the engine.

A step's checkpoint (every `save_freq` steps, at an `exit_interval` step, on a preemption request, at the
end) is written before its metrics line, and holds that line, so the line survives whenever the
checkpoint does. An optimizer step whose gradients are not finite is refused, logged and counted.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_opd.config import OPDConfig
from megatron_opd.models.batch import split_micro_batches
from megatron_opd.models.head import final_hidden_states, output_weight
from megatron_opd.models.pipeline import forward_pass, student_pass
from megatron_opd.trainer import checkpoint, moe_metrics
from megatron_opd.trainer.objective import PARTS, LossInputs, Objective
from megatron_opd.trainer.optim import optimizer_step
from megatron_opd.trainer.preemption import Preemption
from megatron_opd.trainer.prefetch import RolloutPrefetch
from megatron_opd.trainer.rollouts import broadcast, dump_rollouts, step_samples
from megatron_opd.trainer.setup import Run

TIMINGS = ("gen", "teacher", "update_actor", "sync", "step")
MAX_METRICS = ("mismatch/ratio_max",)  # the largest over micro-batches, ranks and updates; the others add up


def _sum_shares(values: dict, dims) -> dict:
    """Sum per-rank metric shares over the DP x CP ranks of the last stage (TP ranks hold copies; one counts)
    to every rank; the MAX_METRICS take the largest instead."""
    names = sorted(broadcast(sorted(values) if dims.rank == dims.world_size - 1 else None, src=dims.world_size - 1))
    vector = dims.tensor([float(values.get(n, 0.0)) if dims.counts_metrics else 0.0 for n in names], torch.float64)
    peaks = vector.clone()
    dist.all_reduce(vector)
    if any(name in MAX_METRICS for name in names):  # ranks that count nothing hold 0: a max is >= 0 here
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return {name: (peak if name in MAX_METRICS else total) for name, total, peak in zip(names, vector.tolist(),
                                                                                       peaks.tolist())}


def _combine(name: str, values: list) -> float:
    """A metric over a step's updates (micro-batches, or mini-batches and epochs)."""
    return max(values) if name in MAX_METRICS else sum(values)


def _part_means(summed: dict) -> dict:
    """The KL of each part's and each teacher's tokens (token-mean), from their summed shares."""
    for part in PARTS:
        tokens, kl_sum = summed.pop(f"actor/tokens_{part}", 0.0), summed.pop(f"actor/kl_sum_{part}", 0.0)
        if tokens:
            summed[f"actor/kl_loss_{part}"] = kl_sum / tokens
    for name in [name for name in summed if name.startswith("teacher/") and name.endswith("/kl_sum")]:
        teacher = name.removesuffix("/kl_sum")
        tokens, kl_sum = summed.pop(f"{teacher}/kl_tokens"), summed.pop(name)
        if tokens:
            summed[f"{teacher}/kl_loss"] = kl_sum / tokens
    return summed


class Trainer:
    def __init__(self, cfg: OPDConfig):
        self.cfg = cfg
        self.run = Run(cfg)
        self.objective = Objective.of_run(cfg, self.run.vocab_size, self.run.dims.tp_group, self.run.teacher)
        self.prefetch = RolloutPrefetch(self.run, cfg) if cfg.rollout.max_staleness else None

    def _optimizer_step(self, mini: list, teacher: list, old_logprobs: list) -> dict:
        """One optimizer step on a mini-batch (this rank's micro-batches); its global metrics."""
        from megatron_opd.loss import response_counts

        cfg, run, dims = self.cfg, self.run, self.run.dims
        counts = response_counts([mb.loss_mask for mb in mini], dp_group=dims.dp_group, cp_group=dims.cp_group)
        weight = output_weight(run.student[-1]) if dims.is_last_stage else None  # [V/TP, H], tied or not

        def share(index, hidden, mb):
            return self.objective(LossInputs(hidden, weight, mb, counts, index, teacher[index], old_logprobs[index]))

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
                shares[name] = _combine(name, [shares[name], float(value)]) if name in shares else float(value)
        return {**_part_means(_sum_shares(shares, dims)), "actor/grad_norm": outcome.grad_norm,
                "actor/skipped_updates": 0.0 if outcome.applied else 1.0}

    def _old_log_probs(self, micro: list) -> list:
        """pg: the student's log-probs of the sampled tokens before the step's first update, per micro-batch on
        the last stage, from a forward-only pass; None where the step has one update, whose current log-probs
        are the same numbers."""
        cfg, run, dims = self.cfg, self.run, self.run.dims
        if cfg.actor.policy_loss != "pg" or cfg.actor.ppo_epochs * run.mini_batches_per_step == 1:
            return [None] * len(micro)
        weight = output_weight(run.student[-1]) if dims.is_last_stage else None

        def keep(hidden, mb):
            return self.objective.log_probs(hidden, weight, mb.labels)

        kept = forward_pass(run.ddp, micro, keep, dims.cp_size, output_processor=final_hidden_states)
        return kept or [None] * len(micro)

    def update(self, samples, batch) -> tuple[dict, float]:
        """Teacher pass (and pi_old's, pg), then every mini-batch of every epoch; averaged metrics and the
        teacher's seconds."""
        cfg, run, dims = self.cfg, self.run, self.run.dims
        rows = batch.size // dims.dp_size // run.mini_batches_per_step
        first = dims.dp_rank * rows * run.mini_batches_per_step
        minis, micro = [], []
        for m in range(run.mini_batches_per_step):  # micro-batches are cut to length before the CP split
            mini = split_micro_batches(batch.rows(first + m * rows, first + (m + 1) * rows), cfg.actor.micro_batch_size,
                                       cfg.actor.max_tokens_per_micro_batch, cfg.parallel.sequence_multiple)
            minis.append(slice(len(micro), len(micro) + len(mini)))
            micro += [mb.context_shard(dims.cp_rank, dims.cp_size) for mb in mini]
        routing = moe_metrics.watch(run.student)
        routing.start()
        started = time.perf_counter()
        teacher = run.teacher.outputs(samples, batch, micro) if run.teacher is not None else [None] * len(micro)
        teacher_s = time.perf_counter() - started
        old = self._old_log_probs(micro)
        updates = [self._optimizer_step(micro[part], teacher[part], old[part])
                   for _ in range(cfg.actor.ppo_epochs) for part in minis]
        names = sorted({name for u in updates for name in u})  # a part can be missing from a mini-batch
        metrics = {name: _combine(name, values) / (1 if name in MAX_METRICS else len(values)) for name in names
                   for values in [[u[name] for u in updates if name in u]]}
        metrics["actor/skipped_updates"] = sum(u["actor/skipped_updates"] for u in updates)
        metrics["actor/lr"] = run.optimizer.param_groups[0]["lr"]
        metrics.update(routing.metrics(dims))  # over the step's updates
        if run.teacher is not None:
            metrics["teacher/bytes_moved_per_token"] = run.teacher.bytes_per_token(batch)
            metrics.update(run.teacher.step_metrics)
        return metrics, teacher_s

    def validate(self) -> dict:
        run = self.run
        accuracy = None
        if run.dims.rank == 0:
            accuracy = run.validate()
        return {"val/accuracy": broadcast(accuracy)}

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
        if self.prefetch is not None:
            samples = self.prefetch.samples(step)
        else:
            samples = step_samples(run, cfg, step, run.next_items())
        metrics = samples.metrics
        gen_s = time.perf_counter() - started
        if cfg.trainer.rollout_data_dir and run.dims.rank == 0:
            dump_rollouts(cfg.trainer.rollout_data_dir, step + 1, samples, run.tokenizer)
        batch = samples.batch(run.pad_id, run.dims.device, cfg.parallel.sequence_multiple)
        if run.engine is not None and self.prefetch is None:  # a colocated server frees its memory for the update
            run.engine.sleep()
        update_started = time.perf_counter()
        if samples.cross is not None:  # a teacher of another tokenizer reads the step's sequences as its own
            run.teacher.read_views(samples.cross)
        update_metrics, teacher_s = self.update(samples.pairs, batch)
        update_s = time.perf_counter() - update_started - teacher_s
        sync_started = time.perf_counter()
        if self.prefetch is not None:  # the engine idle before its weights change
            self.prefetch.wait()
        run.sync_engine(step + 1)
        if run.engine is not None and self.prefetch is None:
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
        if self.prefetch is not None:
            self.prefetch.launch(step + 1 + cfg.rollout.max_staleness)
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
            if self.prefetch is not None:
                self.prefetch.start(step, run.resumed_ahead)
            while step < cfg.trainer.total_steps:
                metrics = self._step(step)
                step += 1
                preempted = step < cfg.trainer.total_steps and preemption.requested(run.dims.device)
                exiting = step < cfg.trainer.total_steps and cfg.trainer.exit_interval > 0 \
                    and step % cfg.trainer.exit_interval == 0
                stopping = preempted or exiting
                if self._checkpoint_due(step, stopping):
                    ahead = {"ahead": self.prefetch.state()} if self.prefetch is not None else {}
                    saved = checkpoint.save(cfg.trainer.save_dir, step, run.ddp, run.optimizer, run.scheduler,
                                            {"sampler": run.sampler.state_dict(), "metrics": metrics,
                                             "skipped_updates": run.skipped_updates, **ahead}, run.dims)
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
            if self.prefetch is not None:
                self.prefetch.close()
            run.close()
            preemption.close()
        return history
