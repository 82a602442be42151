"""megatron_opd.atomic: a file is replaced whole when its write completes; a failed write keeps the old one
and leaves no temporary behind (files and directories)."""
import os

import pytest

from megatron_opd.atomic import replaced_when_done, write_text


def test_a_completed_write_replaces_and_a_failed_one_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest"
    write_text(str(target), "step_000001")
    write_text(str(target), "step_000002")
    assert target.read_text() == "step_000002"
    with pytest.raises(RuntimeError):
        with replaced_when_done(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step_000002" and os.listdir(tmp_path) == ["latest"]


def test_a_failed_directory_write_leaves_nothing(tmp_path):
    target = tmp_path / "converted"
    with pytest.raises(RuntimeError):
        with replaced_when_done(str(target)) as tmp:
            os.makedirs(os.path.join(tmp, "model"))
            raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path) == []
    with replaced_when_done(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, "model"))
    assert os.path.isdir(target / "model")
