"""`teacher_layout`: a Megatron teacher is co-located until one of its sizes differs from the student's; then its
own layout takes the student's tensor and pipeline sizes where it leaves them unset, whole experts (EP=1) unless
it sets its own, and the student's token dispatcher."""
import pytest

from megatron_opd.config import teacher_layout
from tests.runs import run_config


@pytest.mark.parametrize("overrides, own", [
    ((), None),
    (("teacher.parallel.tensor=1", "teacher.parallel.expert=1"), None),
    (("parallel.expert=2", "teacher.parallel.expert=2"), None),
    (("teacher.parallel.expert=2",), dict(tensor=1, pipeline=1, expert=2)),
    (("parallel.tensor=2", "teacher.parallel.expert=2"), dict(tensor=2, pipeline=1, expert=2)),
    (("parallel.expert=2", "teacher.parallel.tensor=2"), dict(tensor=2, pipeline=1, expert=1)),
    (("parallel.expert=2", "teacher.parallel.expert=1"), dict(tensor=1, pipeline=1, expert=1)),
])
def test_a_teacher_has_its_own_layout_where_a_size_differs(distill_setup, tmp_path, overrides, own):
    cfg = run_config(distill_setup, tmp_path, "parallel.token_dispatcher=alltoall", *overrides)
    layout = teacher_layout(cfg)
    if own is None:
        assert layout is None
    else:
        assert {key: getattr(layout, key) for key in own} == own
        assert layout.token_dispatcher == "alltoall" and layout.context == 1
