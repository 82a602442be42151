"""Run a function on N local processes joined in one gloo/NCCL group, with a deadline.

Tests, benchmarks and the CPU demos use this instead of torchrun: forked workers start in ~0.1 s
(megatron is imported once in the parent), a worker's exception is re-raised in the parent with its
traceback, and a hung collective becomes a TimeoutError instead of a hang.
"""
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import time
import traceback
from typing import Any, Callable

import torch

from megatron_opd.parallel import distributed


class WorkerError(RuntimeError):
    pass


def _worker(rank, world_size, port, conn, fn, args, threads, timeout_s):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        distributed.init_distributed(timeout_s=timeout_s)
        payload = ("ok", fn(rank, world_size, *args))
        # Rank 0 hosts the rendezvous store: leaving before every peer is done would pull it from under them.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    except BaseException:
        payload = ("error", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(payload))
    except Exception:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    conn.close()
    # megatron's checkpoint writer leaves a multiprocessing Manager running; it would outlive us.
    for child in mp.active_children():
        child.terminate()
    # Skip atexit/finalizers inherited from the parent (pytest's among them) and the group teardown,
    # which can block when a peer already died.
    os._exit(0)


def _import_megatron_once():
    # Imported before forking, each worker starts in ~0.1 s instead of re-importing megatron (~7 s).
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401


def run_local(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 300.0,
              start_method: str = "fork", threads: int = 1) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns the per-rank results.
    Workers are not daemonic: megatron's checkpoint save starts helper processes of its own. Keep
    threads=1 when forking: a forked child whose parent already ran OpenMP work can stall with more."""
    ctx = mp.get_context(start_method)
    if start_method == "fork":
        _import_megatron_once()
    port = distributed.free_port()
    readers, procs = [], []
    for rank in range(world_size):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker,
                           args=(rank, world_size, port, writer, fn, args, threads, timeout_s))
        proc.start()
        writer.close()
        readers.append(reader)
        procs.append(proc)
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            pending = [r for i, r in enumerate(readers) if i not in results]
            ready = mp.connection.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{fn.__name__}: ranks {sorted(set(range(world_size)) - set(results))} "
                                   f"did not finish within {timeout_s:.0f}s (hung collective?)")
            for reader in ready:
                rank = readers.index(reader)
                try:
                    results[rank] = pickle.loads(reader.recv_bytes())
                except EOFError:
                    results[rank] = ("error", f"rank {rank} died (exit code {procs[rank].exitcode})")
                if results[rank][0] == "error":
                    raise WorkerError(f"{fn.__name__} failed on rank {rank}:\n{results[rank][1]}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(results) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[rank][1] for rank in range(world_size)]
