"""Two tokenisations of one text, matched where both put a token boundary: spans of one or more student
tokens and one or more teacher tokens that write the same bytes. Within a span the teacher's log-probability
of its tokens is the log-probability of the span's text on the teacher's path (the chain rule), and the
student's tokens of the span share it (`span_values`)."""
from dataclasses import dataclass
from itertools import accumulate
from typing import Optional, Sequence


@dataclass(frozen=True)
class Span:
    student: tuple  # [start, stop) of the student's tokens
    teacher: tuple  # [start, stop) of the teacher's tokens

    @property
    def one_to_one(self) -> bool:
        return self.student[1] - self.student[0] == 1 and self.teacher[1] - self.teacher[0] == 1


def align(student_pieces: Sequence[bytes], teacher_pieces: Sequence[bytes]) -> list[Span]:
    """The spans of two tokenisations of the same bytes, in order, covering every token of both. Every token
    must write bytes (special tokens are matched by their role, not here). Raises ValueError otherwise or when
    the bytes differ."""
    if not all(student_pieces) or not all(teacher_pieces):
        raise ValueError("a token that writes no bytes (a special token) cannot be aligned by its text")
    if b"".join(student_pieces) != b"".join(teacher_pieces):
        raise ValueError(f"the two tokenisations write different text: {b''.join(student_pieces)[:80]!r} and "
                         f"{b''.join(teacher_pieces)[:80]!r}")
    student_ends = list(accumulate(len(p) for p in student_pieces))
    teacher_ends = list(accumulate(len(p) for p in teacher_pieces))
    spans, i, j = [], 0, 0
    while i < len(student_ends) or j < len(teacher_ends):
        start = (i, j)
        i, j = min(i + 1, len(student_ends)), min(j + 1, len(teacher_ends))
        while _end(student_ends, i) != _end(teacher_ends, j):
            if _end(student_ends, i) < _end(teacher_ends, j):
                i += 1
            else:
                j += 1
        spans.append(Span((start[0], i), (start[1], j)))
    return spans


def _end(ends: list, count: int) -> int:
    return ends[count - 1] if count else 0


def span_shares(spans: Sequence[Span], student_weights: Optional[Sequence[float]] = None) -> list[float]:
    """Per student token, its share of its span's teacher total: in proportion to `student_weights` (the
    student's own log-probs of its tokens), evenly where there are none or they sum to ~0. Every span's shares
    sum to 1; a span of one student token takes its total whole, exact by the chain rule."""
    shares = [0.0] * (spans[-1].student[1] if spans else 0)
    for span in spans:
        tokens = range(*span.student)
        weights = [student_weights[t] for t in tokens] if student_weights is not None else None
        if weights is None or abs(sum(weights)) < 1e-6:
            weights = [1.0] * len(tokens)
        for t, w in zip(tokens, weights):
            shares[t] = w / sum(weights)
    return shares


def span_index(spans: Sequence[Span]) -> tuple[list[int], list[int]]:
    """(the span of each teacher token, the span of each student token), the spans numbered in order."""
    teacher = [k for k, span in enumerate(spans) for _ in range(*span.teacher)]
    student = [k for k, span in enumerate(spans) for _ in range(*span.student)]
    return teacher, student


def span_values(spans: Sequence[Span], teacher_values: Sequence[float],
                student_weights: Optional[Sequence[float]] = None) -> list[float]:
    """The teacher's per-token log-probs moved onto the student's tokens: each span's total (their sum over its
    teacher tokens) times each student token's share (`span_shares`); every span's student values sum to its
    teacher total."""
    of_teacher, of_student = span_index(spans)
    totals = [0.0] * len(spans)
    for k, value in zip(of_teacher, teacher_values):
        totals[k] += value
    return [totals[k] * share for k, share in zip(of_student, span_shares(spans, student_weights))]


@dataclass(frozen=True)
class AlignStats:
    student_tokens: int
    one_to_one: int  # student tokens in 1:1 spans
    split_boundary: int  # student tokens whose end falls strictly inside a teacher token (their value is a share)

    @classmethod
    def of(cls, spans: Sequence[Span]) -> "AlignStats":
        one = sum(1 for s in spans if s.one_to_one)
        split = sum(max(s.student[1] - s.student[0] - 1, 0) for s in spans)
        return cls(spans[-1].student[1] if spans else 0, one, split)
