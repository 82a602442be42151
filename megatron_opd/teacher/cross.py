"""A teacher of another tokenizer (teacher.tokenizer=cross): a Megatron teacher that scores each sequence as its
own tokenizer writes it (the step's `cross` views, trainer/cross_rows.py), in its own layout or, whole rows, in
the student's, and its values are moved onto the student's positions on the ranks that hold them, then
delivered as an own-layout teacher's are:
  sampled kinds, pg form: each span's total of its per-token log-probs onto the student's tokens of the span
                          (data/xtok/align.py), read as a same-tokenizer teacher's log-probs are;
  full kinds:             its hidden states and log-masses (loss/shared_vocab.py) at the spans of one token on
                          both sides, where both next-token distributions follow the same text; the student's last
                          stage holds its output-layer rows of the strings its vocabulary shard shares with it."""
import torch

from megatron_opd.loss.shared_vocab import SharedVocabHead
from megatron_opd.models.batch import build_batch
from megatron_opd.parallel.exchange import exchange_rows
from megatron_opd.teacher.interface import Teacher
from megatron_opd.teacher.megatron_teacher import MegatronTeacher
from megatron_opd.teacher.outputs import deliver

# The teacher's output layer crosses to the student's shards in blocks of rows: a 152k x 3584 bf16 layer moves
# 117 MiB at a time, not whole
HEAD_BLOCK_ROWS = 16384


class CrossTokenizerTeacher(Teacher):
    def __init__(self, inner: MegatronTeacher, name: str, pad_id: int, student_to_teacher: tuple,
                 student_vocab_shard: int):
        """Collective. `inner`: the teacher on its own vocabulary, run on whole sequences; `name`: its key in the
        step's cross views; `student_to_teacher`: per student id the teacher id of the same string, or -1."""
        super().__init__(inner.student)
        self.inner, self.name, self.pad_id = inner, name, pad_id
        self.full = "hidden" in inner.fields
        self.fields = dict(inner.fields) if self.full else {"logprobs": ((), torch.float32)}
        if self.full:
            self.head_weight = shared_head(inner, student_to_teacher, student_vocab_shard)
        self.view = None  # the step's CrossView

    def read_views(self, views: dict) -> None:
        self.view = views[self.name]

    def outputs(self, samples, batch, student_micro_batches: list, rows=None) -> list:
        view = self.view
        device = self.student.device
        teacher_batch = build_batch([p for p, _ in view.pairs], [r for _, r in view.pairs], self.pad_id, device,
                                    self.inner.dims.config.sequence_multiple)
        held, mine = self.inner.whole_outputs(teacher_batch, rows)
        length, projected = batch.tokens.shape[1], {}
        if held and self.full:
            projected = {name: at_one_to_one(value, view, mine[0], length) for name, value in held.items()}
        elif held:
            projected = {"logprobs": project(held["logprobs"], view, mine[0], length)}
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


def at_one_to_one(values: torch.Tensor, view, first: int, length: int) -> torch.Tensor:
    """[rows, L_t, ...] teacher values at its positions -> [rows, length, ...] at the student's: the values that
    predict a teacher token of a 1:1 span where the student's predict its token of the span; zeros elsewhere."""
    out = values.new_zeros((values.shape[0], length, *values.shape[2:]))
    for r in range(values.shape[0]):
        k = first + r
        if view.one_to_one[k]:
            student = torch.tensor([view.student_at[k][s] for s, _ in view.one_to_one[k]], device=values.device)
            teacher = torch.tensor([view.teacher_at[k][t] for _, t in view.one_to_one[k]], device=values.device)
            out[r, student] = values[r, teacher]
    return out


def shared_head(inner: MegatronTeacher, student_to_teacher: tuple, shard: int):
    """Collective. On the student's last stage the SharedVocabHead of its vocabulary shard: per student id the
    teacher's output-layer row of the same string (zeros where none) [V/TP_s, H_t]; None elsewhere."""
    student, hidden = inner.student, inner.arch.hidden_size
    held, held_rows = inner.held_output_rows()
    first = student.tp_rank * shard
    mine = list(student_to_teacher[first:first + shard])
    ids = torch.tensor(mine + [-1] * (shard - len(mine)), dtype=torch.long, device=student.device)
    head = torch.zeros(shard, hidden, dtype=inner.dtype, device=student.device)
    for block in range(0, inner.vocab_size, HEAD_BLOCK_ROWS):
        stop = min(block + HEAD_BLOCK_ROWS, inner.vocab_size)
        inside = (ids >= block) & (ids < stop)
        wanted = (block, stop) if student.is_last_stage and bool(inside.any()) else None
        rows, _ = exchange_rows(held, held_rows, wanted, (hidden,), inner.dtype, student.device)
        if rows is not None:
            head[inside] = rows[ids[inside] - block]
    return SharedVocabHead(head, ids >= 0) if student.is_last_stage else None
