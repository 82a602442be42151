"""What the trainer asks of a teacher, wherever it runs (on the trainer's ranks or on its own server), the way
`RolloutEngine` is the one interface of the engines."""
import abc
from typing import Optional

import torch

from megatron_opd.parallel import ParallelDims
from megatron_opd.teacher.outputs import bytes_per_token


class Teacher(abc.ABC):
    # The full-vocabulary kinds: the teacher's output layer cut to the student's vocabulary shard [V/TP_s, H_t],
    # on the student's last stage; None otherwise.
    head_weight: Optional[torch.Tensor] = None

    def __init__(self, student: ParallelDims):
        self.student = student
        self.bytes_moved = 0  # teacher outputs this rank sent to others in the last step
        self.step_metrics = {}  # the last step's metrics of its own (several teachers: each one's)

    @abc.abstractmethod
    def outputs(self, samples: list, batch, student_micro_batches: list, rows=None) -> list:
        """Collective. Per student micro-batch, what the loss needs of the teacher (teacher/outputs.py), on the
        student's last stage ([] elsewhere). `samples`: the step's (prompt ids, response ids); `batch`: their
        TokenBatch; `rows`: [B] bool, the sequences to score (None: all; the others may hold zeros, or a
        micro-batch with none of them None)."""

    def read_views(self, views: dict) -> None:
        """The step's views of its sequences by each teacher of another tokenizer (name -> CrossView,
        trainer/cross_rows.py), before its pass; a teacher of the student's tokenizer has none to read."""

    def bytes_per_token(self, batch) -> float:
        """Collective: the bytes of teacher outputs all ranks sent to others this step, per token of the step."""
        return bytes_per_token(self.bytes_moved, batch, self.student.device)

    def close(self) -> None:
        """Idempotent: stops what the teacher started."""
