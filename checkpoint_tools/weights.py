"""Move weights between megatron model chunks (this rank's TP/PP shards) and HF-named tensors.

`load_hf_weights` fills the chunks of any layout from an HF safetensors checkpoint, each rank reading
only the tensors it holds (an expert-parallel rank: its own experts). `export_hf_tensors` streams (HF name,
tensor) pairs out of the chunks, gathering TP shards (expert-TP shards for routed experts) and the other
expert-parallel ranks' experts one parameter at a time; the converter writes them to disk and the rollout
weight sync pushes them into SGLang.
"""
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from checkpoint_tools.hf_files import SafetensorsReader
from checkpoint_tools.mapping import FamilyMapping
from megatron_opd.models import ModelArch, padded_vocab_size
from megatron_opd.models.naming import global_named_tensors


class WeightMismatchError(ValueError):
    """The weights do not fit the config (missing, extra or mis-shaped tensors)."""


def _sized(group):
    return dist.get_world_size(group), dist.get_rank(group), group


def _tp(pg_collection=None):
    """(size, rank, group) of the chunks' TP group: `pg_collection`'s (a layout of its own), else megatron's."""
    from megatron.core import parallel_state

    return _sized(parallel_state.get_tensor_model_parallel_group() if pg_collection is None else pg_collection.tp)


def _expert_groups(pg_collection=None):
    """((size, rank, group) of expert-TP, (size, rank, group) of expert parallelism): `pg_collection`'s, else
    megatron's global ones."""
    from megatron.core import parallel_state as ps

    if pg_collection is not None:
        return _sized(pg_collection.expt_tp), _sized(pg_collection.ep)
    return _sized(ps.get_expert_tensor_parallel_group()), _sized(ps.get_expert_model_parallel_group())


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def load_hf_weights(chunks, arch: ModelArch, hf_dir: str, check_unused: bool = True, pg_collection=None) -> None:
    """Collective when check_unused (the names read on all ranks are compared with the files'). `pg_collection`:
    the chunks' groups (a layout of its own; default: megatron's global ones)."""
    mapping = FamilyMapping(arch)
    reader = SafetensorsReader(hf_dir)
    tp, tp_rank, _ = _tp(pg_collection)
    (etp, etp_rank, _), _ = _expert_groups(pg_collection) if arch.moe else ((1, 0, None), None)
    padded = padded_vocab_size(arch.vocab_size, tp)
    used = set()
    for name, param in global_named_tensors(chunks):  # experts by their global index: this rank's own
        rule, index = mapping.match(name)
        hf_names = rule.hf_names(index)
        missing = [n for n in hf_names if n not in reader.weight_map]
        if missing:
            raise WeightMismatchError(
                f"{hf_dir}: weights lack {missing[0]}, which config.json implies (num_hidden_layers="
                f"{arch.num_layers}, {arch.architecture}); the config and the weights disagree")
        hf_tensors = [reader.get(n) for n in hf_names]
        _check_hf_shapes(hf_dir, hf_names, hf_tensors, arch)
        size, rank = (etp, etp_rank) if rule.expert else (tp, tp_rank)
        full = mapping.to_megatron(rule, hf_tensors, size, padded)
        shard = full.chunk(size, dim=param.partition_dim)[rank] if _is_tp_sharded(param) else full
        if shard.shape != param.shape:
            raise WeightMismatchError(f"{hf_dir}: {', '.join(hf_names)} give shape {tuple(shard.shape)} for "
                                      f"{name}, the config implies {tuple(param.shape)}")
        param.copy_(shard)
        used.update(hf_names)
    if check_unused:
        _check_all_used(hf_dir, [n for n in reader.names() if not mapping.ignored(n)], used)


def _check_hf_shapes(hf_dir, names, tensors, arch: ModelArch):
    for name, tensor in zip(names, tensors):
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and tensor.shape[0] != arch.vocab_size:
            raise WeightMismatchError(f"{hf_dir}: {name} has {tensor.shape[0]} rows, config.json says "
                                      f"vocab_size={arch.vocab_size}")


def _check_all_used(hf_dir, names, used):
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(used))
        used = set().union(*map(set, everyone))
    extra = sorted(set(names) - used)
    if extra:
        raise WeightMismatchError(f"{hf_dir}: {len(extra)} tensors are not used by the model that config.json "
                                  f"describes, e.g. {extra[:3]}; the config and the weights disagree")


def _gather(param, size, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return parts


def _full(param, size, group) -> torch.Tensor:
    """The parameter whole: its TP (or expert-TP) shards concatenated."""
    if not _is_tp_sharded(param) or size == 1:
        return param.detach()
    return torch.cat(_gather(param, size, group), dim=param.partition_dim)


@torch.no_grad()
def export_hf_tensors(chunks, arch: ModelArch, dtype: Optional[torch.dtype] = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter held by this rank's pipeline stage, every expert included.
    Collective over the TP group and, for a mixture-of-experts model, the expert-TP and expert-parallel
    groups (every rank of a stage's TP x EP ranks gets the same tensors). At most one parameter is gathered
    at a time (a routed expert's: its copies on all expert-parallel ranks)."""
    mapping = FamilyMapping(arch)
    tp, _, group = _tp()
    (etp, _, etp_group), (ep, ep_rank, ep_group) = _expert_groups() if arch.moe else ((1, 0, None), (1, 0, None))
    for name, param in global_named_tensors(chunks):
        rule, index = mapping.match(name)
        if not mapping.exported(rule):
            continue
        if not rule.expert:
            outputs = [(index, _full(param, tp, group))]
        else:  # expert e here is expert e + (r - ep_rank) * E/EP on expert-parallel rank r
            full = _full(param, etp, etp_group)
            step = arch.moe.num_experts // ep
            copies = _gather(full, ep, ep_group) if ep > 1 else [full]
            outputs = [(dict(index, e=index["e"] + (r - ep_rank) * step), copy) for r, copy in enumerate(copies)]
        for where, whole in outputs:
            for hf_name, tensor in zip(rule.hf_names(where), mapping.to_hf(rule, whole, etp if rule.expert else tp)):
                yield hf_name, tensor if dtype is None else tensor.to(dtype)
