"""run_jobs' progress (progress.py) on fake job graphs, in well under a second: the estimate's arithmetic on
given numbers; where the output is not a terminal, a line per job started and finished (its seconds, the
jobs done out of all, the elapsed time, "estimating…" until there is something to go on, then the time
left) and the running jobs' steps out of their totals from the metrics.jsonl of the training CLIs they launch
(cli_runner.cli, its subprocess faked), never from an earlier run's file, no more often than every_s; on a
terminal one status line redrawn in place that what a job writes (stdout, stderr there too) clears first;
the poller thread gone, stdout and stderr given back and a job's exception raised when run_jobs ends."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest

from megatron_opd.demo import cli_runner
from megatron_opd.demo.jobs import Job, run_jobs
from megatron_opd.demo.progress import Cost, Progress, StatusLine, about, duration, seconds_left

FAST = dict(poll_s=0.01, every_s=0.05)


def _wait_for(stream: io.StringIO, text: str, timeout_s: float = 2.0) -> None:
    """Until `text` is in the output (a test that never sees it fails on its assertions, not here)."""
    deadline = time.monotonic() + timeout_s
    while text not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.005)


def _fake_trainer(monkeypatch, stream: io.StringIO, shown: str) -> None:
    """cli_runner's subprocess: a training run that, once the poller showed the run at step 0 (with an
    earlier run's metrics.jsonl still in its save_dir), logs steps 1 and 2, waits until they are shown as
    `shown`, then logs the rest."""
    def run(command, **_):
        given = dict(arg.split("=", 1) for arg in command if "=" in arg)
        path, total = os.path.join(given["trainer.save_dir"], "metrics.jsonl"), int(given["trainer.total_steps"])
        _wait_for(stream, "teacher step 0/4")
        with open(path, "w") as f:  # the trainer rewrites an earlier run's file as it starts
            for step in range(1, total + 1):
                f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
                f.flush()
                if step == 2:
                    _wait_for(stream, shown)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(cli_runner, "subprocess", types.SimpleNamespace(run=run))


def _graph(tmp_path, teacher_says: str = None) -> list[Job]:
    """data -> teacher (a training CLI of 4 steps, declared) -> eval; the teacher's save_dir holds an earlier
    run's metrics.jsonl (step 9, an hour old)."""
    save_dir = tmp_path / "teacher"
    save_dir.mkdir()
    (save_dir / "metrics.jsonl").write_text(json.dumps({"step": 9}) + "\n")
    os.utime(save_dir / "metrics.jsonl", (time.time() - 3600,) * 2)

    def teacher():
        cli_runner.cli("megatron_opd.train", f"trainer.save_dir={save_dir}", "trainer.total_steps=4")
        if teacher_says:
            print(teacher_says)

    return [Job("data", lambda: None, str(tmp_path / "data.done")),
            Job("teacher", teacher, str(tmp_path / "teacher.done"), ("data",), steps=4),
            Job("eval", lambda: None, str(tmp_path / "eval.done"), ("teacher",))]


def _progress_threads() -> list:
    return [thread for thread in threading.enumerate() if thread.name == "progress"]


def test_the_estimate_on_given_numbers():
    # seconds per step over the jobs done and running: (48 + 16) / (64 done + 64 logged) = 0.5 (0.75 and 0.25
    # apart); the other jobs' expected seconds scaled by 16 / 32 = 0.5, as measured
    costs = [Cost(steps=64, elapsed_s=48.0, done=True), Cost(steps=256, step=64, elapsed_s=16.0),
             Cost(steps=150), Cost(prior_s=32.0, elapsed_s=16.0, done=True), Cost(prior_s=40.0),
             Cost(prior_s=32.0, elapsed_s=6.0)]
    # left: 192 x 0.5 + 150 x 0.5 + 40 x 0.5 + (32 x 0.5 - 6) = 201 seconds, over 2 lanes
    assert seconds_left(costs, 2) == 100.5
    assert seconds_left(costs, 4) == 96.0  # never less than the longest job left: 192 steps x 0.5
    assert seconds_left(costs[3:], 1) == 30.0  # 20 + 10: no steps left, none need timing
    assert seconds_left([Cost(steps=10, step=0), Cost(prior_s=30.0)], 2) is None  # nothing done or timed
    assert seconds_left(costs[3:] + [Cost(steps=10)], 2) is None  # steps left, none timed
    assert seconds_left([Cost(prior_s=30.0, elapsed_s=15.0, done=True), Cost(prior_s=30.0, elapsed_s=60.0)],
                        2) == 0.0  # a job past its expected time: none left, not less
    assert (duration(42), duration(192), duration(3900)) == ("42s", "3m12s", "1h05m")
    assert (about(42), about(372), about(3900), about(7190)) == ("~42s", "~6m", "~1h05m", "~2h00m")


def test_lines_where_the_output_is_not_a_terminal(tmp_path, monkeypatch):
    out = io.StringIO()
    _fake_trainer(monkeypatch, out, "teacher step 2/4 ·")
    run_jobs(_graph(tmp_path), 2, str(tmp_path / "seconds.json"), progress=Progress(out, terminal=False, **FAST))
    text = out.getvalue()
    assert "\r" not in text and "step 9/" not in text  # no redraws; an earlier run's metrics.jsonl unread
    status = [line for line in text.splitlines() if re.match(r"\[\d/3 done\] ", line)]  # as time passed
    jobs = [line for line in text.splitlines() if line not in status]  # as jobs started and finished
    clock = r"\d+s elapsed · "
    assert jobs[0::2] == ["[data]", "[teacher]", "[eval]"] and len(jobs) == 6
    assert re.fullmatch(rf"\[data\] done in \d+s · 1/3 done · {clock}estimating…", jobs[1])  # no step timed
    assert re.fullmatch(rf"\[teacher\] done in \d+s · 2/3 done · {clock}~\d+s left", jobs[3])
    assert re.fullmatch(rf"\[eval\] done in \d+s · 3/3 done · {clock}~0s left", jobs[5])
    assert any(re.fullmatch(rf"\[1/3 done\] teacher step 0/4 · {clock}estimating…", line) for line in status)
    assert any(re.fullmatch(rf"\[1/3 done\] teacher step 2/4 · {clock}~\d+s left", line) for line in status)


def test_a_long_job_gets_a_status_line_every_every_s_and_no_more(tmp_path):
    out = io.StringIO()
    (tmp_path / "earlier.done").write_text("")  # a job done before: skipped, and counted done
    seconds = run_jobs([Job("earlier", lambda: None, str(tmp_path / "earlier.done")),
                        Job("slow", lambda: time.sleep(0.4), str(tmp_path / "slow.done"))], 1,
                       str(tmp_path / "seconds.json"), progress=Progress(out, terminal=False, poll_s=0.01, every_s=0.1))
    status = [line for line in out.getvalue().splitlines() if line.startswith("[1/2 done] slow · ")]
    assert 2 <= len(status) <= seconds["slow"] / 0.1 + 1


def test_one_status_line_redrawn_on_a_terminal(tmp_path, monkeypatch):
    out = io.StringIO()
    shown = "\r[1/3 done] teacher step 2/4 · "
    _fake_trainer(monkeypatch, out, shown)
    run_jobs(_graph(tmp_path, teacher_says="teacher says hi"), 2, str(tmp_path / "seconds.json"),
             progress=Progress(out, terminal=True, **FAST))
    text = out.getvalue()
    assert re.search(r"\r\[1/3 done\] teacher step 2/4 · \d+s elapsed · ~\d+s left\x1b\[K", text)
    assert "[data]\n" not in text and "[teacher]\n" not in text  # the status line names the jobs running
    # a finished job's line and a job's print each take a line of their own, clearing the status line first
    for done, name in enumerate(("data", "teacher", "eval"), 1):
        assert re.search(rf"(^|\n|\r\x1b\[K)\[{name}\] done in \d+s · {done}/3 done · [^\r\n]+\n", text), name
    assert "\r\x1b[Kteacher says hi\n" in text  # printed while the status line was shown
    assert text.endswith("\r\x1b[K")  # cleared at the end

    terminal, stderr = io.StringIO(), io.StringIO()
    line = StatusLine(terminal)
    line.writer(terminal).write("half a print")
    line.draw("status")  # not between a print's text and its newline
    line.writer(terminal).write("\n")
    line.draw("status")
    line.writer(stderr).write("a warning\n")  # stderr on the same terminal clears it too
    assert terminal.getvalue() == "half a print\n\rstatus\x1b[K\r\x1b[K" and stderr.getvalue() == "a warning\n"


class _TerminalStderr(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_the_poller_stops_when_run_jobs_returns_or_a_job_raises(tmp_path, monkeypatch, terminal):
    """On a terminal, stdout and stderr (there too) clear the status line while jobs run, and are given back."""
    monkeypatch.setattr(sys, "stderr", _TerminalStderr())
    stdout, stderr, seen = sys.stdout, sys.stderr, []
    progress = Progress(io.StringIO(), terminal=terminal, **FAST)
    run_jobs([Job("quick", lambda: seen.append((sys.stdout, sys.stderr)) or time.sleep(0.03),
                  str(tmp_path / "quick.done"))], 2, str(tmp_path / "seconds.json"), progress=progress)
    assert not _progress_threads() and (sys.stdout, sys.stderr) == (stdout, stderr)
    assert (seen[0][0] is stdout, seen[0][1] is stderr) == (not terminal, not terminal)

    def fails():
        time.sleep(0.03)
        raise ValueError("the job's own error")

    with pytest.raises(ValueError, match="the job's own error"):
        run_jobs([Job("fails", fails, str(tmp_path / "fails.done")),
                  Job("after", lambda: None, str(tmp_path / "after.done"), ("fails",))], 2,
                 str(tmp_path / "seconds.json"), force=True, progress=progress)
    assert not _progress_threads() and (sys.stdout, sys.stderr) == (stdout, stderr)
