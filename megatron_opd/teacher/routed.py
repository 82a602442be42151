"""Several teachers in one run, each scoring the sequences of its data sources (`teachers`; the batch's
`teacher_index` says whose each sequence is). Each teacher runs only where it has sequences: a co-located
one on the student's micro-batches that hold one of them, one in its own layout on its micro-batches that do,
a served one on its sequences alone. Per student micro-batch the loss gets every teacher's part (None where
a teacher scored none of its rows) and picks each row's own (trainer/objective.py), so a step may mix
teachers and each row's divergence is the one its teacher alone would give.

Every Megatron teacher stays resident for the run, each in its layout: co-located, a rank holds 1/(TP x PP)
of it beside the student; in a layout of its own, 1/(its TP x PP), so a teacher spread over all ranks costs
each rank 1/world of it."""
import time

import torch

from megatron_opd.teacher.interface import Teacher


class RoutedTeachers(Teacher):
    def __init__(self, teachers: dict, student):
        """`teachers`: name -> Teacher, in the order of the batch's teacher_index."""
        super().__init__(student)
        self.names, self.teachers = list(teachers), list(teachers.values())
        # Per teacher (by index), the full kinds' output layer cut to the student's shard, or None.
        self.head_weight = [teacher.head_weight for teacher in self.teachers]

    def outputs(self, samples, batch, student_micro_batches: list, rows=None) -> list:
        """Collective: per student micro-batch {"parts": [teacher 0's outputs or None, teacher 1's, ...]}. Which
        teachers run is decided from the batch alone, the same on every rank."""
        parts, self.bytes_moved, self.step_metrics = [], 0, {}
        for index, (name, teacher) in enumerate(zip(self.names, self.teachers)):
            mine = batch.teacher_index == index
            if rows is not None:
                mine = mine & rows
            if not bool(mine.any()):
                parts.append(None)
                continue
            started = time.perf_counter()
            parts.append(teacher.outputs(samples, batch, student_micro_batches, mine))
            self.bytes_moved += teacher.bytes_moved
            self.step_metrics.update({f"teacher/{name}/time_s": time.perf_counter() - started,
                                      f"teacher/{name}/sequences": float(mine.sum()),
                                      f"teacher/{name}/tokens_scored": float(batch.loss_mask[mine].sum())})
        if not any(part for part in parts if part is not None):  # not the student's last stage
            return []
        return [{"parts": [part[m] if part else None for part in parts]} for m in range(len(student_micro_batches))]

    def read_views(self, views: dict) -> None:
        for teacher in self.teachers:
            teacher.read_views(views)

    def close(self) -> None:
        teachers, self.teachers = self.teachers, []
        for teacher in teachers:
            teacher.close()


def per_teacher(teacher_outputs: dict, micro_batch, heads, fn) -> torch.Tensor:
    """A per-token quantity [mb, s] of a micro-batch whose rows may belong to several teachers: fn(rows,
    outputs, head) -> [n, s] for the rows `rows` (a slice or index tensor) of one teacher, with that
    teacher's outputs cut to them and its head; `teacher_outputs` one teacher's (rows = all), or RoutedTeachers'
    parts (the micro-batch's teacher_index says whose each row is)."""
    if "parts" not in teacher_outputs:
        return fn(slice(None), teacher_outputs, heads)
    teacher_index, out = micro_batch.teacher_index, None
    for index, part in enumerate(teacher_outputs["parts"]):
        rows = torch.nonzero(teacher_index == index).squeeze(-1)
        if part is None or not rows.numel():
            continue
        values = fn(rows, {name: value[rows] for name, value in part.items()}, heads[index])
        if out is None:
            out = torch.zeros((teacher_index.shape[0], *values.shape[1:]), dtype=values.dtype, device=values.device)
        out = out.index_put((rows,), values)
    return out
