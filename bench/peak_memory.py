"""Peak resident memory of a piece of work on Linux, for the CPU benchmarks: the process's VmHWM, reset
through /proc/self/clear_refs, above its RSS just before the work. glibc's mmap threshold is pinned low
while measuring so that every tensor is mapped on allocation and unmapped on free (none hides in the heap),
then set back to glibc's steady state for timed runs. On CUDA: torch's peak allocated bytes."""
import ctypes
import gc
import re
import time

import torch

_LIBC = ctypes.CDLL("libc.so.6")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MEASURE_MMAP_BYTES, STEADY_MMAP_BYTES = 1 << 16, 32 << 20


def mmap_threshold(nbytes: int) -> None:
    """Fix glibc's mmap threshold (which stops its dynamic adjustment) and, as that adjustment would, a
    trim threshold of twice it, so that a freed buffer at the heap's top is kept for reuse."""
    _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)


def status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def start_measuring() -> float:
    """Pin the mmap threshold, drop what is free, reset the peak; returns the RSS (MiB) the peak is taken above."""
    mmap_threshold(MEASURE_MMAP_BYTES)
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def peak_since(base_mib: float) -> float:
    """MiB of peak RSS above `base_mib`; glibc back to its steady state."""
    peak = status_mib("VmHWM") - base_mib
    mmap_threshold(STEADY_MMAP_BYTES)
    return peak


def peak_and_seconds(work, device: torch.device):
    """(work()'s result, peak MiB above what was allocated before it, its seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = start_measuring()
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_since(base)
    return result, peak, time.perf_counter() - started
