"""How busy the rest of the machine is while a benchmark runs. With 2 threads on a 2-core machine, one other
busy process can stretch a step 10-80x (a parallel region waits for a descheduled thread), so the load
average is no guide: what counts is the CPU the other processes take during each run."""
import os
import resource
import time

TICKS = os.sysconf("SC_CLK_TCK")


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OthersMeter:
    """Cores' worth of CPU that processes other than this one and its (waited-for) children use between
    start() and stop()."""

    def start(self) -> None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        self.began = (time.monotonic(), busy_s(), children_cpu_s() + own.ru_utime + own.ru_stime)

    def stop(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        wall, busy, ours = time.monotonic(), busy_s(), children_cpu_s() + own.ru_utime + own.ru_stime
        return max(0.0, (busy - self.began[1]) - (ours - self.began[2])) / max(wall - self.began[0], 1e-9)


def wait_for_quiet(threshold: float, max_wait_s: float, window_s: float = 3.0) -> float:
    """Waits until the other processes use under `threshold` cores over a window, or `max_wait_s` passed;
    the last window's reading."""
    deadline = time.monotonic() + max_wait_s
    meter = OthersMeter()
    while True:
        meter.start()
        time.sleep(window_s)
        others = meter.stop()
        if others < threshold or time.monotonic() >= deadline:
            return others
