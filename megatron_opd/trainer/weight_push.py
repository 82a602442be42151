"""The student's weights, as HF-named tensors, from every pipeline stage to the engine on global rank 0."""
import torch
import torch.distributed as dist

from checkpoint_tools.weights import export_hf_tensors


def _stage_sender_ranks() -> list[int]:
    """Global rank of TP rank 0 / DP rank 0 of each pipeline stage, in stage order."""
    from megatron.core import parallel_state

    ranks = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    mine = (parallel_state.get_pipeline_model_parallel_rank(), dist.get_rank()
            if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
            else None)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for stage, rank in everyone:
        if rank is not None and ranks[stage] is None:
            ranks[stage] = rank
    return ranks


def _stream_to_rank0(chunks, arch, senders: list[int]):
    """On rank 0: yields every stage's tensors in order. Elsewhere: sends its stage's tensors (or just
    takes part in the TP gathers) and yields nothing."""
    from megatron.core import parallel_state

    me, stage = dist.get_rank(), parallel_state.get_pipeline_model_parallel_rank()
    in_first_data_replica = parallel_state.get_data_parallel_rank() == 0
    if me == 0:
        yield from export_hf_tensors(chunks, arch)
        for sender in senders[1:]:
            header = [None]
            while True:
                dist.recv_object_list(header, src=sender)
                if header[0] is None:
                    break
                name, shape, dtype = header[0]
                tensor = torch.empty(shape, dtype=dtype)
                dist.recv(tensor, src=sender)
                yield name, tensor
    elif in_first_data_replica and stage > 0:
        sending = me == senders[stage]
        for name, tensor in export_hf_tensors(chunks, arch):
            if sending:
                dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=0)
                dist.send(tensor.contiguous(), dst=0)
        if sending:
            dist.send_object_list([None], dst=0)
    elif in_first_data_replica:
        for _ in export_hf_tensors(chunks, arch):  # TP peers of rank 0: their part of each gather
            pass


def push_weights(engine, chunks, arch, version: int) -> None:
    """Collective. Rank 0 streams the full model into `engine` as `version`."""
    senders = _stage_sender_ranks()
    tensors = _stream_to_rank0(chunks, arch, senders)
    if dist.get_rank() == 0:
        engine.update_weights(tensors, version)
    else:
        for _ in tensors:
            pass
    dist.barrier()

