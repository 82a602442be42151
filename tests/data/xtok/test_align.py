"""Spans where both tokenisations put a boundary, and the teacher's log-probs moved onto the student's tokens
with every span's total kept."""
import pytest

from megatron_opd.data.xtok.align import AlignStats, Span, align, span_values


def test_spans_close_where_both_tokenisations_end_a_token():
    spans = align([b"ab", b"c", b"de", b"f"], [b"a", b"bc", b"def"])
    assert spans == [Span((0, 2), (0, 2)), Span((2, 4), (2, 3))]
    assert AlignStats.of(spans) == AlignStats(student_tokens=4, one_to_one=0, split_boundary=2)
    same = align([b"x", b"yz"], [b"x", b"yz"])
    assert [s.one_to_one for s in same] == [True, True]
    assert AlignStats.of(same) == AlignStats(2, 2, 0)
    # one student token over two teacher tokens: exact (the chain rule), no split boundary
    assert AlignStats.of(align([b"abc"], [b"a", b"bc"])) == AlignStats(1, 0, 0)


@pytest.mark.parametrize("student, teacher, message", [
    ([b"ab"], [b"ac"], "write different text"),
    ([b"a", b""], [b"a"], "writes no bytes"),
])
def test_what_cannot_be_aligned_is_refused(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        align(student, teacher)


def test_span_values_keep_each_span_total_and_split_by_the_students_log_probs():
    spans = [Span((0, 2), (0, 2)), Span((2, 4), (2, 3)), Span((4, 5), (3, 5))]
    teacher = [-1.0, -2.0, -3.0, -0.5, -0.25]
    student = [-0.5, -1.5, -1.0, -2.0, -9.0]
    values = span_values(spans, teacher, student)
    assert values == pytest.approx([-0.75, -2.25, -1.0, -2.0, -0.75])
    # without the student's log-probs (or where they sum to ~0) evenly
    assert span_values(spans, teacher) == pytest.approx([-1.5, -1.5, -1.5, -1.5, -0.75])
    assert span_values(spans, teacher, [0.0, 0.0, -1.0, -2.0, 0.0]) == pytest.approx([-1.5, -1.5, -1.0, -2.0, -0.75])
