"""The student's weights, as HF-named tensors, from every pipeline stage to the engine on global rank 0."""
import torch
import torch.distributed as dist

from checkpoint_tools.weights import export_hf_tensors
from megatron_opd.parallel import ParallelDims


def _stage_sender_ranks(dims: ParallelDims) -> list[int]:
    """Global rank of TP rank 0 / DP rank 0 / CP rank 0 of each pipeline stage, in stage order."""
    sends = dims.tp_rank == 0 and dims.dp_rank == 0 and dims.cp_rank == 0
    everyone = [None] * dims.world_size
    dist.all_gather_object(everyone, (dims.pp_rank, dims.rank if sends else None))
    ranks = [None] * dims.config.pipeline
    for stage, rank in everyone:
        if rank is not None:
            ranks[stage] = rank
    return ranks


def _stream_to_rank0(chunks, arch, senders: list[int], dims: ParallelDims):
    """On rank 0: yields every stage's tensors in order. Elsewhere: sends its stage's tensors (or just
    takes part in the TP and expert-parallel gathers) and yields nothing."""
    # The first replica of every weight: dense ones at DP = CP = 0, experts over the expert-parallel peers of
    # those ranks, which megatron carves out of the DP x CP ranks; expert_dp_rank 0 is exactly that set.
    in_first_replica = dims.expert_dp_rank == 0
    if dims.rank == 0:
        yield from export_hf_tensors(chunks, arch)
        for sender in senders[1:]:
            header = [None]
            while True:
                dist.recv_object_list(header, src=sender, device=dims.device)
                if header[0] is None:
                    break
                name, shape, dtype = header[0]
                tensor = torch.empty(shape, dtype=dtype, device=dims.device)
                dist.recv(tensor, src=sender)
                yield name, tensor
    elif in_first_replica and dims.pp_rank > 0:
        sending = dims.rank == senders[dims.pp_rank]
        for name, tensor in export_hf_tensors(chunks, arch):
            if sending:
                dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=0, device=dims.device)
                dist.send(tensor.contiguous(), dst=0)
        if sending:
            dist.send_object_list([None], dst=0, device=dims.device)
    elif in_first_replica:
        for _ in export_hf_tensors(chunks, arch):  # TP peers of rank 0: their part of each gather
            pass


def push_weights(engine, chunks, arch, version: int, dims: ParallelDims) -> None:
    """Collective. Rank 0 streams the full model into `engine` as `version`."""
    tensors = _stream_to_rank0(chunks, arch, _stage_sender_ranks(dims), dims)
    if dims.rank == 0:
        engine.update_weights(tensors, version)
    else:
        for _ in tensors:
            pass
    dist.barrier()
