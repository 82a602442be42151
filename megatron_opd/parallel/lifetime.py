"""Helper processes that die with the process that started them, even when it is SIGKILLed (the OOM
killer, `kill -9`): Linux's parent-death signal, set in the child before it runs anything else."""
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the dynamic loader's lock may be held by another thread at fork time, and a
# dlopen in the child would then wait for it forever.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int) -> None:
    """Call in the child (a `preexec_fn`, a process initializer). The signal follows the *thread* that
    forked the child, so fork from a thread that lives as long as the parent (the main thread)."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
