"""A teacher of another tokenizer (teacher.tokenizer=cross): a Megatron teacher that scores each sequence as its
own tokenizer writes it (the step's `cross` views, trainer/cross_rows.py), in its own layout or, whole rows, in
the student's; each span's total of its per-token log-probs is moved onto the student's tokens of the span
(data/xtok/align.py) on the ranks that hold them, then delivered as an own-layout teacher's are. The sampled
kinds and the policy-gradient form read those values as they read a same-tokenizer teacher's."""
import torch

from megatron_opd.models.batch import build_batch
from megatron_opd.teacher.interface import Teacher
from megatron_opd.teacher.megatron_teacher import MegatronTeacher
from megatron_opd.teacher.outputs import deliver


class CrossTokenizerTeacher(Teacher):
    def __init__(self, inner: MegatronTeacher, name: str, pad_id: int):
        """`inner`: the teacher on its own vocabulary, run on whole sequences; `name`: its key in the step's
        cross views."""
        super().__init__(inner.student)
        self.inner, self.name, self.pad_id = inner, name, pad_id
        self.fields = {"logprobs": ((), torch.float32)}
        self.views = {}  # the step's, teacher name -> CrossView: set by the trainer before the step's pass

    def outputs(self, samples, batch, student_micro_batches: list, rows=None) -> list:
        view = self.views[self.name]
        device = self.student.device
        teacher_batch = build_batch([p for p, _ in view.pairs], [r for _, r in view.pairs], self.pad_id, device,
                                    self.inner.dims.config.sequence_multiple)
        held, mine = self.inner.whole_outputs(teacher_batch, rows)
        length = batch.tokens.shape[1]
        projected = {"logprobs": project(held["logprobs"], view, mine[0], length)} if held else {}
        out, self.bytes_moved = deliver(projected, mine if held else None, self.fields, self.student,
                                        student_micro_batches, batch.size, length)
        return out

    def close(self) -> None:
        self.inner.close()


def project(teacher_logprobs: torch.Tensor, view, first: int, length: int) -> torch.Tensor:
    """[rows, L_t] teacher next-token log-probs of the sequences from `first` on -> [rows, length] at the
    student's positions: each span's teacher total times each of its student tokens' share; 0 where the
    student has no aligned token."""
    device = teacher_logprobs.device
    out = torch.zeros(teacher_logprobs.shape[0], length, dtype=torch.float32, device=device)
    for r in range(teacher_logprobs.shape[0]):
        k = first + r
        if not view.aligned[k]:
            continue
        of_teacher = torch.tensor(view.span_of_teacher[k], dtype=torch.long, device=device)
        totals = torch.zeros(int(of_teacher.max()) + 1, dtype=torch.float64, device=device)
        values = teacher_logprobs[r, torch.tensor(view.teacher_at[k], dtype=torch.long, device=device)]
        totals.index_add_(0, of_teacher, values.double())
        of_student = torch.tensor(view.span_of_student[k], dtype=torch.long, device=device)
        shares = torch.tensor(view.shares[k], dtype=torch.float64, device=device)
        at = torch.tensor(view.student_at[k], dtype=torch.long, device=device)
        out[r, at] = (totals[of_student] * shares).float()
    return out
