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


def span_values(spans: Sequence[Span], teacher_values: Sequence[float],
                student_weights: Optional[Sequence[float]] = None) -> list[float]:
    """The teacher's per-token log-probs moved to the student's tokens: each span's total (their sum over its
    teacher tokens) split over its student tokens in proportion to `student_weights` (the student's own
    log-probs of them), evenly where there are none or they sum to ~0. A span of one student token gets its
    total whole, exact by the chain rule; so every span's student values sum to its teacher total."""
    count = spans[-1].student[1] if spans else 0
    out = [0.0] * count
    for span in spans:
        total = sum(teacher_values[span.teacher[0]:span.teacher[1]])
        tokens = range(*span.student)
        if not tokens:
            continue
        weights = [student_weights[t] for t in tokens] if student_weights is not None else None
        if weights is None or abs(sum(weights)) < 1e-6:
            weights = [1.0] * len(tokens)
        scale = total / sum(weights)
        for t, w in zip(tokens, weights):
            out[t] = w * scale
    return out


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
