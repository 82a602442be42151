"""The teacher on the trainer's own ranks: a frozen megatron model in the student's layout (co-located, the
default) or in a layout of its own (`teacher.parallel.{tensor,pipeline}`, parallel/own_layout.py).

Co-located, it runs the student's micro-batches (CP chunks included) and its outputs stay where they are
made. In its own layout it runs its data-parallel share of the step's sequences, whole, and its outputs go
to the student's last-stage ranks that train on the same sequences (parallel/exchange.py). Either way, for
the full-vocabulary kinds the student's last stage holds the teacher's output layer cut to the student's
vocabulary shard (sent once, at start-up), and forms the teacher's logits from its hidden states inside
the loss.
"""
from typing import Optional

import torch

from checkpoint_tools.pretrained import load_pretrained
from megatron_opd.loss.kinds import FULL_KINDS
from megatron_opd.loss.shared_vocab import teacher_log_masses
from megatron_opd.models.batch import split_micro_batches
from megatron_opd.models.head import final_hidden_states, output_weight
from megatron_opd.models.pipeline import forward_pass
from megatron_opd.parallel import ParallelDims
from megatron_opd.parallel.exchange import exchange_rows
from megatron_opd.teacher.interface import Teacher
from megatron_opd.teacher.outputs import deliver, output_fields, per_token_values, whole_rows


def holds_outputs(dims: ParallelDims) -> bool:
    """One rank per copy of each output: its last stage, TP rank 0 (and CP rank 0)."""
    return dims.is_last_stage and dims.tp_rank == 0 and dims.cp_rank == 0


class MegatronTeacher(Teacher):
    def __init__(self, path: str, dtype: str, student: ParallelDims, own_dims: Optional[ParallelDims], actor,
                 temperature: float, vocab_size: int, student_vocab_shard: int, unshared=None):
        """Collective. `own_dims`: the teacher's own layout (None: co-located, in the student's); `vocab_size`:
        the vocabulary both tokenizers share. `unshared` [vocab_size] bool: a teacher of another tokenizer (its own
        vocabulary), the ids whose string the student's has not; for the full kinds it keeps beside its hidden
        states its log-normaliser and the mass of those (loss/shared_vocab.py), and cuts no head itself."""
        super().__init__(student)
        self.kind, self.topk, self.temperature, self.vocab_size = actor.kl_loss_type, actor.topk, temperature, vocab_size
        self.actor = actor
        self.colocated = own_dims is None
        self.dims = student if own_dims is None else own_dims
        self.arch, self.chunks = load_pretrained(path, self.dims.config, dtype, pg_collection=self.dims.pg_collection)
        if actor.max_tokens_per_micro_batch:  # micro-batches of varying shapes cross pipeline stages
            self.chunks[0].config.variable_seq_lengths = True
        self.dtype = self.chunks[0].config.params_dtype
        self.fields = output_fields(self.kind, self.topk, self.arch.hidden_size, self.dtype)
        self.unshared = None
        if unshared is not None and self.kind in FULL_KINDS:
            self.unshared = self._own_shard(unshared)
            self.fields["log_masses"] = ((2,), torch.float32)
        full_head = self.kind in FULL_KINDS and unshared is None
        self.head_weight = self._head_for_student(student_vocab_shard) if full_head else None

    def _own_shard(self, columns: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of a [vocab_size] mask, as its output-layer shard's rows (False past the vocabulary)."""
        rows = output_weight(self.chunks[-1]).shape[0] if self.dims.is_last_stage else 0
        start = self.dims.tp_rank * rows
        out = torch.zeros(rows, dtype=torch.bool, device=self.student.device)
        piece = columns[start:start + rows]
        out[:piece.shape[0]] = piece.to(out.device)
        return out

    def held_output_rows(self) -> tuple:
        """(this rank's output-layer rows of the vocabulary [rows, H_t], their global [start, stop)) on the one copy
        that sends them (last stage, DP and CP rank 0), (None, None) elsewhere."""
        dims = self.dims
        if not (dims.is_last_stage and dims.dp_rank == 0 and dims.cp_rank == 0):
            return None, None
        weight = output_weight(self.chunks[-1]).detach()  # [V_t/TP_t, H_t]
        start = dims.tp_rank * weight.shape[0]
        if start >= self.vocab_size:
            return None, None
        stop = min(start + weight.shape[0], self.vocab_size)
        return weight[:stop - start], (start, stop)

    def _head_for_student(self, shard: int):
        """Collective. The teacher's output-layer rows of the student's vocabulary shard [V/TP_s, H_t] on the
        student's last-stage ranks (zeros past the shared vocabulary), None elsewhere."""
        student, hidden = self.student, self.arch.hidden_size
        held, held_rows = self.held_output_rows()
        wanted = None
        start = student.tp_rank * shard
        if student.is_last_stage and start < self.vocab_size:
            wanted = (start, min(start + shard, self.vocab_size))
        rows, _ = exchange_rows(held, held_rows, wanted, (hidden,), self.dtype, student.device)
        if not student.is_last_stage:
            return None
        head = torch.zeros(shard, hidden, dtype=self.dtype, device=student.device)
        if rows is not None:
            head[:rows.shape[0]] = rows
        return head

    def _pass(self, micro_batches: list) -> list:
        full = self.kind in FULL_KINDS

        def keep(output, batch):
            if full and self.unshared is not None:
                hidden = output.detach()
                return {"hidden": hidden, "log_masses": teacher_log_masses(
                    hidden, output_weight(self.chunks[-1]).detach(), self.unshared, self.temperature,
                    self.dims.tp_group, self.vocab_size).float()}
            if full:
                return {"hidden": output.detach()}
            return per_token_values(output, batch.labels, self.kind, self.topk, self.temperature, self.vocab_size,
                                    self.dims.tp_group)

        return forward_pass(self.chunks, micro_batches, keep, self.dims.cp_size, self.dims.pg_collection,
                            final_hidden_states if full else None)

    def outputs(self, samples, batch, student_micro_batches: list, rows=None) -> list:
        if self.colocated:
            wanted = [m for m, mb in enumerate(student_micro_batches) if scores_any(mb, rows)]
            kept = self._pass([student_micro_batches[m] for m in wanted]) if wanted else []
            if not self.student.is_last_stage:
                return []
            out = [None] * len(student_micro_batches)
            for m, values in zip(wanted, kept):
                out[m] = values
            return out
        held, mine = self.whole_outputs(batch, rows)
        out, self.bytes_moved = deliver(held, mine if held else None, self.fields, self.student,
                                        student_micro_batches, batch.size, batch.tokens.shape[1])
        return out

    def whole_outputs(self, batch, rows=None) -> tuple[dict, tuple]:
        """Collective over the teacher's layout: its data-parallel share of `batch`'s sequences, whole, run;
        (their outputs as whole rows on the ranks that hold them ({} elsewhere), the share's rows [first, end))."""
        dims, length = self.dims, batch.tokens.shape[1]
        share = batch.size // dims.dp_size
        mine = (dims.dp_rank * share, (dims.dp_rank + 1) * share)
        micro = [mb for mb in split_micro_batches(batch.rows(*mine), self.actor.micro_batch_size,
                                                  self.actor.max_tokens_per_micro_batch, dims.config.sequence_multiple)
                 if scores_any(mb, rows)]
        kept = self._pass(micro) if micro else []
        if not holds_outputs(dims):
            return {}, mine
        return whole_rows(kept, micro, self.fields, mine[0], share, length, self.student.device), mine


def scores_any(micro_batch, rows) -> bool:
    """Whether a micro-batch holds a sequence the teacher scores (`rows`: [B] over the step's batch; None: all)."""
    return rows is None or bool(rows[micro_batch.index].any())
