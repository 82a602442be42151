"""What run_jobs' graph is doing as it runs: the jobs running, a training job's step out of its total (the
last step in its metrics.jsonl, once the job's thread launched the CLI through track_training), the graph's
elapsed time and an estimate of the time left.

The estimate (seconds_left) charges each job not done in one of two currencies:
- steps: a training job whose total steps are known (Job.steps, or its CLI's trainer.total_steps once
  launched): its steps left times the seconds per step measured in this run, over the training jobs done
  and those running past their first step (seconds over steps: a job's start-up is charged to its steps);
- seconds: any other job: its seconds in an earlier run's seconds.json, else DEFAULT_S, times the ratio of
  measured to expected seconds over the other jobs done in this run (1 before one is), less what it has run.
The sum is divided over the lanes, and is never less than the longest job left (a job runs in one lane). It
ignores the graph's order: when fewer jobs are ready than lanes (the end of a graph) it is low. It says
"estimating…" until a job is done or a step is timed, and while steps are left and no step is timed.

Output: on a terminal one status line redrawn in place every POLL_S, with each finished job a line above
it; elsewhere (CI, a pipe, a file) no redraws: a line as each job starts and as it finishes, and the status
line when EVERY_S passed with no line printed."""
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_S = 30.0  # a job that neither trains nor has an earlier time: the demo's data, evaluations, sampling
POLL_S, EVERY_S = 1.0, 60.0
TAIL_BYTES = 65536  # of metrics.jsonl read for its last step: many lines of the trainer's metrics
_thread = threading.local()  # .job: (Progress, job name) of the job this thread runs


@dataclass
class Cost:
    """What is known of a job's cost, as seconds_left reads it."""
    steps: int = 0  # a training job's optimizer steps, when known
    prior_s: float = DEFAULT_S  # a job not training: the seconds expected of it
    step: int = 0  # the last step it logged
    elapsed_s: float = 0.0  # seconds it has run (all of them once done)
    done: bool = False


def seconds_left(costs: list[Cost], lanes: int):
    """The seconds left of these jobs on `lanes`, or None with nothing to go on (see the module docstring)."""
    timed = [c for c in costs if c.steps and (c.done or c.step)]
    per_step = sum(c.elapsed_s for c in timed) / sum(c.steps if c.done else c.step for c in timed) if timed else None
    others = [c for c in costs if not c.steps and c.done]
    scale = sum(c.elapsed_s for c in others) / sum(c.prior_s for c in others) if others else 1.0
    if not (timed or others):
        return None
    left = []
    for c in (c for c in costs if not c.done):
        if c.steps and per_step is None:
            return None
        left.append((c.steps - c.step) * per_step if c.steps else max(0.0, c.prior_s * scale - c.elapsed_s))
    return max(sum(left) / lanes, max(left, default=0.0))


def last_step(path: str, since: float):
    """The last step logged in the metrics.jsonl `path`, None before one is or while the file is older than
    `since` (time.time() at launch): an earlier run's file stays there until the trainer rewrites it."""
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines[:-1]):  # lines[-1]: after the last newline, a line the trainer is writing
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def track_training(save_dir: str, total_steps: int) -> None:
    """Called on a job's thread as it launches a training CLI (cli_runner.cli): the job's progress is then
    the last step of save_dir/metrics.jsonl out of total_steps. Nothing outside run_jobs."""
    bound = getattr(_thread, "job", None)
    if bound:
        progress, name = bound
        progress._track(name, os.path.join(save_dir, "metrics.jsonl"), total_steps)


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def about(seconds: float) -> str:
    """An estimate to the minute past one: its seconds would be false precision."""
    s, m = round(seconds), round(seconds / 60)
    return f"~{s}s" if s < 60 else f"~{m}m" if m < 60 else f"~{m // 60}h{m % 60:02d}m"


class StatusLine:
    """A terminal with a status line drawn at its bottom. Its writers stand in for stdout and for stderr on the
    same terminal: a write clears the status line first (the poller draws it again), so what a job prints,
    a library's warning or progress bar included, lands on a line of its own."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()
        self.shown, self.fresh = False, True  # fresh: the last write ended its line, so a status line may follow

    def writer(self, stream) -> "_Through":
        return _Through(self, stream)

    def draw(self, status: str) -> None:
        with self.lock:
            if self.fresh:  # never between a print's text and its newline, nor over an open progress bar
                self.stream.write("\r" + status + "\x1b[K")
                self.stream.flush()
                self.shown = True

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()  # before what another stream writes there
            self.shown = False


class _Through:
    def __init__(self, line: StatusLine, stream):
        self.line, self.stream = line, stream

    def write(self, text: str) -> int:
        with self.line.lock:
            self.line._clear()
            self.line.fresh = text.endswith("\n") if text else self.line.fresh
            return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Progress:
    """Reports on one run_jobs at a time. `stream`: sys.stdout when None; `terminal`: whether to redraw a
    status line, the stream's isatty() when None."""

    def __init__(self, stream=None, terminal: bool = None, poll_s: float = POLL_S, every_s: float = EVERY_S):
        self.stream, self.terminal, self.poll_s, self.every_s = stream, terminal, poll_s, every_s
        self._lock = threading.RLock()  # the state below, and the order of the lines written

    @contextmanager
    def watching(self, jobs: list, pending: list, lanes: int, earlier: dict):
        """Reports while the block runs `pending` of the graph `jobs`; `earlier`: an earlier run's seconds."""
        stream = self.stream or sys.stdout
        self._redraw = stream.isatty() if self.terminal is None else self.terminal
        self._status_line = StatusLine(stream)
        self._out = self._status_line.writer(stream) if self._redraw else stream
        self._total, self._done, self._lanes = len(jobs), len(jobs) - len(pending), lanes
        self._costs = {job.name: Cost(job.steps, earlier.get(job.name, DEFAULT_S)) for job in pending}
        self._started, self._runs = {}, {}  # running job -> its start; -> (metrics.jsonl, launched at)
        self._began = self._last_line = time.perf_counter()
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(stop,), name="progress", daemon=True)
        saved = sys.stdout, sys.stderr
        if self._redraw:
            sys.stdout = self._out
            sys.stderr = self._status_line.writer(sys.stderr) if sys.stderr.isatty() else sys.stderr
        poller.start()
        try:
            yield self
        finally:
            stop.set()
            poller.join()
            if self._redraw:
                self._status_line.clear()
                sys.stdout, sys.stderr = saved

    @contextmanager
    def running(self, job):
        """The block runs `job` on this thread; a training CLI it launches registers through track_training."""
        with self._lock:
            self._started[job.name] = time.perf_counter()
            if not self._redraw:  # on a terminal the status line names it
                self._line(f"[{job.name}]")
        _thread.job = (self, job.name)
        try:
            yield
        except BaseException:
            with self._lock:  # no longer running; the exception says why
                del self._started[job.name]
                self._runs.pop(job.name, None)
            raise
        finally:
            _thread.job = None

    def finished(self, name: str, seconds: float) -> None:
        with self._lock:
            del self._started[name]
            self._runs.pop(name, None)
            self._costs[name].done, self._costs[name].elapsed_s = True, seconds
            self._done += 1
            self._line(f"[{name}] done in {duration(seconds)} · {self._done}/{self._total} done · {self._clock()}")
            self._draw()

    def _track(self, name: str, path: str, total_steps: int) -> None:
        with self._lock:
            self._costs[name].steps, self._costs[name].step = total_steps, 0
            self._runs[name] = (path, time.time())

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            with self._lock:
                runs = dict(self._runs)
            steps = {name: last_step(path, since) for name, (path, since) in runs.items()}  # no lock while reading
            with self._lock:
                for name, step in steps.items():
                    if name in self._runs and step is not None:
                        self._costs[name].step = step
                if self._redraw:
                    self._draw()
                elif time.perf_counter() - self._last_line >= self.every_s:
                    self._line(self._status())

    def _status(self, width: int = None) -> str:
        """The status line; within `width` by cutting the running jobs short, not the clock."""
        running = [f"{name} step {self._costs[name].step}/{self._costs[name].steps}" if name in self._runs else name
                   for name in self._started]
        head, clock = f"[{self._done}/{self._total} done] " + "".join(f"{job} · " for job in running), self._clock()
        if width and len(head) + len(clock) > width:
            head = head[:max(0, width - len(clock) - 2)] + "… "
        return (head + clock)[:width]

    def _clock(self) -> str:
        now = time.perf_counter()
        for name, started in self._started.items():
            self._costs[name].elapsed_s = now - started
        left = seconds_left(list(self._costs.values()), self._lanes)
        return f"{duration(now - self._began)} elapsed · " + (f"{about(left)} left" if left is not None
                                                               else "estimating…")

    def _line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()
        self._last_line = time.perf_counter()

    def _draw(self) -> None:
        if self._redraw:
            self._status_line.draw(self._status(shutil.get_terminal_size().columns - 1))
