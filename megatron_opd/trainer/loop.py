"""The on-policy distillation loop (and its SFT mode) on megatron-core.

One step: a prompt batch -> student rollouts from the engine (global rank 0, broadcast) -> the co-located
teacher's forward-only pass (same layout, outputs kept sharded on the last stage) -> the student's
forward-backward with the distillation loss, `ppo_epochs` passes over `ppo_mini_batch_size` mini-batches,
one optimizer step each -> the new weights pushed to the engine.
"""
import os
import time

import torch
import torch.distributed as dist

from megatron_opd.trainer import checkpoint
from megatron_opd.trainer.batch import build_batch
from megatron_opd.trainer.config import OPDConfig
from megatron_opd.trainer.objective import sft_loss, student_loss, teacher_outputs
from megatron_opd.trainer.pipeline import student_pass, teacher_pass
from megatron_opd.trainer.preemption import Preemption
from megatron_opd.trainer.setup import Run

TIMINGS = ("gen", "teacher", "update_actor", "sync", "step")


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _last_stage_sum(values: dict) -> dict:
    """Sum per-rank metric shares over data-parallel ranks (TP ranks hold copies; one counts) to all ranks."""
    from megatron.core import parallel_state

    names = sorted(_broadcast(sorted(values) if dist.get_rank() == dist.get_world_size() - 1 else None,
                              src=dist.get_world_size() - 1))
    counts = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    vector = torch.tensor([float(values.get(n, 0.0)) if counts else 0.0 for n in names], dtype=torch.float64)
    dist.all_reduce(vector)
    return dict(zip(names, vector.tolist()))


class Trainer:
    def __init__(self, cfg: OPDConfig):
        self.cfg = cfg
        self.run = Run(cfg)

    def rollouts(self, step: int, items: list[dict]):
        """Prompt+response token lists for this step, the same on every rank."""
        cfg, run = self.cfg, self.run
        prompts = [item["input_ids"] for item in items]
        if cfg.trainer.mode == "sft":
            return [(p, item["response_ids"]) for p, item in zip(prompts, items)], {}
        samples = None
        if dist.get_rank() == 0:
            samples = [(s.prompt_ids, s.response_ids) for s in run.engine.generate(prompts, run.sampling(step))]
        samples = _broadcast(samples)
        lengths = [len(r) for _, r in samples]
        return samples, {"response_length/mean": sum(lengths) / len(lengths), "response_length/max": max(lengths)}

    def _teacher(self, micro: list) -> list:
        cfg, run = self.cfg, self.run
        if cfg.trainer.mode != "distill":
            return [None] * len(micro)
        keep = lambda logits, mb: teacher_outputs(logits, mb.labels, cfg.actor, cfg.rollout.temperature,
                                                  run.vocab_size, run.tp_group)
        return teacher_pass(run.teacher, micro, keep)

    def _optimizer_step(self, mini: list, teacher: list, data_parallel: int) -> dict:
        """One optimizer step on a mini-batch (this rank's micro-batches); its global metrics."""
        from megatron_opd.loss import response_counts

        cfg, run = self.cfg, self.run
        counts = response_counts([mb.loss_mask for mb in mini], dp_group=run.dp_group)

        def share(index, logits, mb):
            if cfg.trainer.mode == "sft":
                return sft_loss(logits, mb.labels, mb.loss_mask, run.vocab_size, run.tp_group, counts, index,
                                cfg.actor.loss_agg_mode)
            return student_loss(logits, mb.labels, mb.loss_mask, teacher[index], cfg.actor, cfg.rollout.temperature,
                                run.vocab_size, run.tp_group, counts, index)

        for chunk in run.ddp:
            chunk.zero_grad_buffer()
        run.optimizer.zero_grad()
        results = student_pass(run.ddp, mini, share, scale=len(mini) * data_parallel)
        _, grad_norm, _ = run.optimizer.step()
        run.scheduler.step(increment=1)
        shares = {}
        for result in results:
            for name, value in result.items():
                shares[name] = shares.get(name, 0.0) + float(value)
        return {**_last_stage_sum(shares), "actor/grad_norm": float(grad_norm or 0.0)}

    def update(self, batch) -> tuple[dict, float]:
        """Teacher pass, then every mini-batch of every epoch; averaged metrics and the teacher's seconds."""
        from megatron.core import parallel_state

        cfg, run = self.cfg, self.run
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = batch.size // dp
        micro = batch.rows(dp_rank * rows, (dp_rank + 1) * rows).micro_batches(cfg.actor.micro_batch_size)
        started = time.perf_counter()
        teacher = self._teacher(micro)
        teacher_s = time.perf_counter() - started
        per_mini = len(micro) // run.mini_batches_per_step
        minis = [slice(m * per_mini, (m + 1) * per_mini) for m in range(run.mini_batches_per_step)]
        updates = [self._optimizer_step(micro[part], teacher[part], dp)
                   for _ in range(cfg.actor.ppo_epochs) for part in minis]
        metrics = {name: sum(u[name] for u in updates) / len(updates) for name in updates[0]}
        metrics["actor/lr"] = run.optimizer.param_groups[0]["lr"]
        return metrics, teacher_s

    def validate(self) -> dict:
        run = self.run
        accuracy = None
        if dist.get_rank() == 0:
            accuracy = run.validate()
        return {"val/accuracy": _broadcast(accuracy)}

    def train(self) -> list[dict]:
        cfg, run = self.cfg, self.run
        history = []
        preemption = Preemption()
        step = run.start_step
        run.sync_engine(step)
        if cfg.trainer.test_freq and step == 0:
            run.log(0, self.validate())
        while step < cfg.trainer.total_steps:
            started = time.perf_counter()
            items = run.next_items()
            samples, metrics = self.rollouts(step, items)
            gen_s = time.perf_counter() - started
            batch = build_batch([p for p, _ in samples], [r for _, r in samples], run.pad_id)
            update_started = time.perf_counter()
            update_metrics, teacher_s = self.update(batch)
            update_s = time.perf_counter() - update_started - teacher_s
            step += 1
            sync_started = time.perf_counter()
            run.sync_engine(step)
            sync_s = time.perf_counter() - sync_started
            metrics.update(update_metrics)
            if cfg.trainer.mode == "distill":
                metrics["actor/distillation_mode"] = 1.0
            step_s = time.perf_counter() - started
            metrics.update({f"timing_s/{k}": v for k, v in zip(TIMINGS, (gen_s, teacher_s, update_s, sync_s, step_s))})
            metrics["perf/tokens_per_s"] = int(batch.loss_mask.numel()) / step_s
            if cfg.trainer.test_freq and step % cfg.trainer.test_freq == 0:
                metrics.update(self.validate())
            stopping = step < cfg.trainer.total_steps and preemption.requested()  # collective
            if (cfg.trainer.save_freq and step % cfg.trainer.save_freq == 0) or step == cfg.trainer.total_steps \
                    or stopping:
                saved = checkpoint.save(cfg.trainer.save_dir, step, run.ddp, run.optimizer, run.scheduler,
                                        {"sampler": run.sampler.state_dict()})
            run.log(step, metrics)
            history.append({"step": step, **metrics})
            if stopping:  # after the step's metrics line: the resumed run starts at the next step
                preemption.saved(step, saved)
                break
        if cfg.trainer.export_hf and step == cfg.trainer.total_steps:
            run.export_hf(os.path.join(cfg.trainer.save_dir, "hf"))
        run.close()
        preemption.close()
        return history
