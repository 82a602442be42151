"""The teacher on its own SGLang server (`teacher.engine=sglang`): rank 0 has the step's sequences scored —
the sampled token's log-prob for kl/abs/mse/low_var_kl, the top-k for topk_* — and the rows reach the
student's last-stage ranks like a teacher in its own layout's (teacher/outputs.py: deliver).

The server is one rank 0 starts on the run's device from `teacher.path` (an HF directory) with
`teacher.sglang`, restarted when it dies, or an existing one at `teacher.url`, which this run never starts or
stops: a lost request waits for it to answer again and is retried, a bounded number of times. Scoring runs
on the rollout engine's request pool and recovery (rollout/sglang_engine.py); a teacher has no weights to
sync.

Two differences from the Megatron teacher, both in SGLang: its log-probs are normalised over the model's
whole configured vocabulary, padding rows included (the Megatron teacher masks ids at or above the shared
tokenizer length); and scoring ignores the request's temperature (input log-probs are always at T=1), which
is why the config admits a served teacher only with divergences at temperature 1.
"""
import dataclasses
import os
from typing import Optional

import torch

from checkpoint_tools.pretrained import is_hf_dir
from megatron_opd.config import ConfigError
from megatron_opd.loss.kinds import TOPK_KINDS
from megatron_opd.parallel import HOST, ParallelDims
from megatron_opd.rollout.engine import RolloutError, ScoredSequence
from megatron_opd.rollout.sglang_engine import SGLangEngine
from megatron_opd.teacher.interface import Teacher
from megatron_opd.teacher.outputs import deliver, output_fields

SERVER_LOG = "{name}_sglang.log"  # under trainer.save_dir unless the teacher's sglang.log_path names one


class TeacherEngine(SGLangEngine):
    """The rollout engine's scoring, request pool and recovery, for a model that never changes: a (re)started
    server serves the checkpoint it was started from, so nothing is named or pushed after a start."""

    def start(self) -> None:
        self.server.start()


def shared_vocab_topk(scored: ScoredSequence, k: int, vocab_size: int) -> tuple[list, list]:
    """Per position, the first `k` of the server's top ids below `vocab_size` and their log-probs."""
    ids, logprobs = [], []
    for position, (top_ids, top_logprobs) in enumerate(zip(scored.top_ids, scored.top_logprobs)):
        kept = [(i, lp) for i, lp in zip(top_ids, top_logprobs) if i < vocab_size][:k]
        if len(kept) < k:
            raise RolloutError(f"the teacher's server gave {len(kept)} ids below the shared vocabulary size "
                               f"{vocab_size} at position {position}, {k} needed (actor.topk): does teacher.url serve "
                               f"teacher.path's model?")
        ids.append([i for i, _ in kept])
        logprobs.append([lp for _, lp in kept])
    return ids, logprobs


class ServedTeacher(Teacher):
    def __init__(self, cfg, teacher, student: ParallelDims, vocab_size: int, key: str = "teacher"):
        """`teacher`: its TeacherConfig, `key` its place in the config (teacher, teachers.<name>); `vocab_size`:
        the vocabulary both tokenizers share. Rank 0 starts or connects to the server."""
        super().__init__(student)
        if teacher.url is None and not is_hf_dir(teacher.path):  # every rank: none may go on without the others
            raise ConfigError(f"{key}.path={teacher.path}: a converted Megatron checkpoint, which an SGLang "
                              f"server cannot load; convert it with `opd-convert mcore-to-hf --mcore {teacher.path} "
                              f"--out DIR` and set {key}.path=DIR (or use {key}.engine=megatron)")
        self.kind, self.vocab_size = cfg.actor.kl_loss_type, vocab_size
        self.top_k = cfg.actor.topk if self.kind in TOPK_KINDS else 0
        self.fields = output_fields(self.kind, cfg.actor.topk, 0, torch.float32)
        self.engine = None
        if student.rank == 0:
            config = teacher.sglang
            if config.log_path is None:
                log = SERVER_LOG.format(name=key.replace(".", "_"))
                config = dataclasses.replace(config, log_path=os.path.join(cfg.trainer.save_dir, log))
            self.engine = TeacherEngine(teacher.path, config, student.device, url=teacher.url, url_key=f"{key}.url")
            # A position's top-k can hold at most this many padding ids, which the shared vocabulary drops.
            self.padding_rows = max(self.engine.model_vocab_size - vocab_size, 0)
            if teacher.url is None:
                self.engine.start()

    @property
    def url(self) -> Optional[str]:
        """The server's address on rank 0 (None elsewhere)."""
        return self.engine.server.url if self.engine is not None else None

    def _scored(self, sequences: list[list[int]]) -> list[ScoredSequence]:
        scored = self.engine.score(sequences, self.top_k)
        if self.top_k:
            # Rare in trained models: padding ids among a position's top-k. Such a sequence is scored again
            # with room for all of them, so that k ids of the shared vocabulary remain everywhere.
            padded = [i for i, s in enumerate(scored) if any(t >= self.vocab_size for ids in s.top_ids for t in ids)]
            again = self.engine.score([sequences[i] for i in padded], self.top_k + self.padding_rows) if padded else []
            for i, rescored in zip(padded, again):
                scored[i] = rescored
        return scored

    def _rows(self, samples, length: int, wanted: list[int]) -> dict:
        """Rank 0: the `wanted` sequences' values in [B, length, ...] (zeros from a sequence's last token on,
        and in the rows not wanted)."""
        sequences = [list(prompt) + list(response) for prompt, response in samples]
        # Filled from the server's lists in host memory, then moved to the run's device in one copy.
        rows = {name: torch.zeros((len(sequences), length, *shape), dtype=dtype, device=HOST)
                for name, (shape, dtype) in self.fields.items()}
        scored_rows = self._scored([sequences[row] for row in wanted]) if wanted else []
        for row, scored in zip(wanted, scored_rows):
            # Position t holds the log-prob of token t + 1 (SGLang's input_token_logprobs after its first entry).
            scored_positions = len(scored.token_logprobs)
            if self.top_k:
                ids, logprobs = shared_vocab_topk(scored, self.top_k, self.vocab_size)
                rows["topk_ids"][row, :scored_positions] = torch.tensor(ids, dtype=torch.long,
                                                                        device=HOST).reshape(-1, self.top_k)
                rows["topk_logprobs"][row, :scored_positions] = torch.tensor(logprobs, device=HOST).reshape(-1, self.top_k)
            else:
                rows["logprobs"][row, :scored_positions] = torch.tensor(scored.token_logprobs, device=HOST)
        return {name: value.to(self.student.device) for name, value in rows.items()}

    def outputs(self, samples, batch, student_micro_batches: list, rows=None) -> list:
        length = batch.tokens.shape[1]
        wanted = list(range(batch.size)) if rows is None else torch.nonzero(rows).squeeze(-1).tolist()
        held = self._rows(samples, length, wanted) if self.engine is not None else {}
        out, self.bytes_moved = deliver(held, (0, batch.size) if self.engine is not None else None, self.fields,
                                        self.student, student_micro_batches, batch.size, length)
        return out

    def close(self) -> None:
        """Stops a server rank 0 started (a server at teacher.url keeps running). Idempotent."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop()
