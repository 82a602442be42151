"""Save and load model chunks as megatron `torch_dist` checkpoints, loadable at any TP/PP/VPP.

dist_checkpointing reshards every tensor except one case it cannot: the vocabulary is padded to a
multiple of 128*TP, so a checkpoint written at one TP can hold a different number of embedding rows than
the model built at another. Those two tensors are read whole and re-cut here; the padded rows carry no
token, so only the rows both sides have are copied.
"""
import multiprocessing as mp
import os
import shutil
from multiprocessing.managers import SyncManager

import torch
import torch.distributed as dist

from megatron_opd.parallel.lifetime import die_with_parent

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _sharded_state_dict(chunks, pg_collection=None) -> dict:
    """The chunks' sharded state; with their own groups (`pg_collection`), replicas counted in those."""
    metadata = None if pg_collection is None else {"dp_cp_group": pg_collection.dp_cp}
    return {f"chunk{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


_writer_manager = None


def use_forked_writer_queue() -> None:
    """megatron's torch_dist writer reports through the queue of a multiprocessing Manager, which it makes on
    first use with the spawn context: a fresh interpreter that imports torch (~3 s, ~0.7 GB), and one that
    outlives a SIGKILLed trainer, asleep, for good. The queue is made here instead, from a forked manager
    (immediate) that dies with the process that made it."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _writer_manager = SyncManager(ctx=mp.get_context("fork"))
        _writer_manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _writer_manager.Queue()


def save_model(chunks, ckpt_dir: str) -> None:
    """Collective. Writes to `<ckpt_dir>.tmp` and renames at the end: an interrupted save leaves
    no half-written `ckpt_dir` (and an existing one is replaced only once the new one is complete)."""
    from megatron.core import dist_checkpointing

    use_forked_writer_queue()
    tmp_dir, old_dir = f"{ckpt_dir}.tmp", f"{ckpt_dir}.old"
    rank0 = _global_rank() == 0
    if rank0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    _barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), tmp_dir)
    _barrier()
    if rank0:
        if os.path.exists(ckpt_dir):
            os.replace(ckpt_dir, old_dir)
        os.replace(tmp_dir, ckpt_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    _barrier()


def _swap_vocab_tensors(sharded: dict, saved_meta: dict, tp_rank: int) -> list:
    """Replace vocab tensors whose saved row count differs by whole-tensor reads; return what to re-cut."""
    from megatron.core.dist_checkpointing import ShardedTensor

    recut = []
    for chunk_key, chunk_sd in sharded.items():
        for name, entry in chunk_sd.items():
            if not isinstance(entry, ShardedTensor) or entry.key not in VOCAB_KEYS or entry.key not in saved_meta:
                continue
            saved_shape = tuple(saved_meta[entry.key].global_shape)
            if saved_shape == tuple(entry.global_shape):
                continue
            whole = torch.empty(saved_shape, dtype=entry.data.dtype, device=entry.data.device)
            # Each TP rank now reads the whole tensor: the TP rank joins the replica id, so that exactly
            # one reader stays the main replica.
            replica = entry.replica_id if isinstance(entry.replica_id, tuple) else (entry.replica_id,)
            chunk_sd[name] = ShardedTensor.from_rank_offsets(
                entry.key, whole, replica_id=(*replica, tp_rank))
            recut.append((chunk_key, name, entry))
    return recut


def load_model(chunks, ckpt_dir: str, pg_collection=None) -> None:
    """Collective. Load `ckpt_dir` into `chunks` (built for the current layout, or for the groups of
    `pg_collection`); every parameter must come from the checkpoint."""
    from megatron.core import dist_checkpointing, parallel_state

    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise FileNotFoundError(f"{ckpt_dir}: not a torch_dist checkpoint (no metadata.json)")
    sharded = _sharded_state_dict(chunks, pg_collection)
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if pg_collection is None else pg_collection.tp.rank()
    recut = _swap_vocab_tensors(sharded, dist_checkpointing.load_tensors_metadata(ckpt_dir), tp_rank)
    state = dist_checkpointing.load(sharded, ckpt_dir)
    for chunk_key, name, entry in recut:
        whole, local = state[chunk_key][name], torch.zeros_like(entry.data)
        start = entry.global_offset[0]
        rows = max(0, min(whole.shape[0], start + local.shape[0]) - start)
        local[:rows] = whole[start:start + rows]
        state[chunk_key][name] = local
    for i, chunk in enumerate(chunks):
        check_loaded_state(chunk, state[f"chunk{i}"], ckpt_dir)


def check_loaded_state(module, state_dict: dict, source: str) -> None:
    """Load `state_dict` into `module`; every parameter and buffer must come from it, and nothing else
    (Transformer Engine's `_extra_state` entries excepted: they carry no weights)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{source}: checkpoint does not fit the model: missing {missing}, "
                           f"unexpected {list(unexpected)}")
