"""A cross-tokenizer teacher's values on the student's positions: its per-position next-token log-probs, moved
span by span (teacher/cross.project), equal the data side's span values (data/xtok) at the positions the
student's batch predicts its response tokens from, and sum to the teacher's total over each response."""
import pytest
import torch

from megatron_opd.data.chat import encode_prompt
from megatron_opd.data.xtok import Span, span_values
from megatron_opd.demo.tiny import train_tokenizer
from megatron_opd.teacher.cross import project
from megatron_opd.trainer.cross_rows import CrossTokens

TEXTS = ["natalia sold 48 clips in april", "héllo wörld\n12 + 30 = 42 #### 42"]


def test_projected_values_are_the_span_values_at_the_students_positions():
    student, teacher = train_tokenizer(), train_tokenizer(kind="metaspace")
    cross = CrossTokens(student, teacher, "student", "teacher", "teacher")
    prompts = [[{"role": "user", "content": "question"}]] * len(TEXTS)
    pairs = [(encode_prompt(student, p), student.encode(t, add_special_tokens=False) + [student.eos_token_id])
             for p, t in zip(prompts, TEXTS)]
    weights = [None, [-0.5 - (k % 3) for k in range(len(pairs[1][1]))]]
    view, metrics = cross.view(prompts, pairs, weights, [True] * len(pairs))
    assert metrics["xtok/aligned_share"] == 1 and metrics["xtok/split_boundary_share"] > 0
    length = max(len(p) + len(r) for p, r in pairs) + 3
    teacher_length = max(len(p) + len(r) for p, r in view.pairs)
    logprobs = -torch.rand(len(pairs), teacher_length, generator=torch.Generator().manual_seed(0))
    out = project(logprobs, view, 0, length)
    for k, ((prompt, response), (t_prompt, t_response)) in enumerate(zip(pairs, view.pairs)):
        teacher_values = logprobs[k, len(t_prompt) - 1:len(t_prompt) + len(t_response) - 1].tolist()
        spans = _spans(view, k)
        expected = span_values(spans, teacher_values, weights[k])
        at = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
        assert out[k, at].tolist() == pytest.approx(expected, abs=1e-6)
        assert out[k, at].sum().item() == pytest.approx(sum(teacher_values), abs=1e-5)
        assert out[k, :at.start].abs().sum() == 0 and out[k, at.stop:].abs().sum() == 0


def _spans(view, k) -> list:
    """The spans of sequence k, back from the view's span numbers."""
    spans, t0, s0 = [], 0, 0
    for span in range(max(view.span_of_student[k]) + 1):
        t1 = t0 + view.span_of_teacher[k].count(span)
        s1 = s0 + view.span_of_student[k].count(span)
        spans.append(Span((s0, s1), (t0, t1)))
        t0, s0 = t1, s1
    return spans
