"""Move weights between megatron model chunks (this rank's TP/PP shards) and HF-named tensors.

`load_hf_weights` fills the chunks of any layout from an HF safetensors checkpoint, each rank reading
only the tensors it holds. `export_hf_tensors` streams (HF name, tensor) pairs out of the chunks,
gathering TP shards one parameter at a time; the converter writes them to disk and the rollout weight
sync pushes them into SGLang.
"""
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from checkpoint_tools.hf_files import SafetensorsReader
from checkpoint_tools.mapping import FamilyMapping
from megatron_opd.models import ModelArch, padded_vocab_size
from megatron_opd.models.naming import global_named_parameters


class WeightMismatchError(ValueError):
    """The weights do not fit the config (missing, extra or mis-shaped tensors)."""


def _tp(group=None):
    """(size, rank, group) of `group`, by default megatron's global TP group."""
    from megatron.core import parallel_state

    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    return dist.get_world_size(group), dist.get_rank(group), group


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def load_hf_weights(chunks, arch: ModelArch, hf_dir: str, check_unused: bool = True, tp_group=None) -> None:
    """Collective when check_unused (the names read on all ranks are compared with the files'). `tp_group`:
    the chunks' TP group (default: megatron's global one)."""
    mapping = FamilyMapping(arch)
    reader = SafetensorsReader(hf_dir)
    tp, tp_rank, _ = _tp(tp_group)
    padded = padded_vocab_size(arch.vocab_size, tp)
    used = set()
    for name, param in global_named_parameters(chunks):
        rule, layer = mapping.match(name)
        hf_names = rule.hf_names(layer)
        missing = [n for n in hf_names if n not in reader.weight_map]
        if missing:
            raise WeightMismatchError(
                f"{hf_dir}: weights lack {missing[0]}, which config.json implies (num_hidden_layers="
                f"{arch.num_layers}, {arch.architecture}); the config and the weights disagree")
        hf_tensors = [reader.get(n) for n in hf_names]
        _check_hf_shapes(hf_dir, hf_names, hf_tensors, arch)
        full = mapping.to_megatron(rule, hf_tensors, tp, padded)
        shard = full.chunk(tp, dim=param.partition_dim)[tp_rank] if _is_tp_sharded(param) else full
        if shard.shape != param.shape:
            raise WeightMismatchError(f"{hf_dir}: {', '.join(hf_names)} give shape {tuple(shard.shape)} for "
                                      f"{name}, the config implies {tuple(param.shape)}")
        param.copy_(shard)
        used.update(hf_names)
    if check_unused:
        _check_all_used(hf_dir, reader.names(), used)


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


def _gather_tp(param, tp, group) -> torch.Tensor:
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def export_hf_tensors(chunks, arch: ModelArch, dtype: Optional[torch.dtype] = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter held by this rank's pipeline stage. Collective over the
    TP group (every TP rank gets the same tensors). At most one gathered parameter is alive at a time."""
    mapping = FamilyMapping(arch)
    tp, _, group = _tp()
    for name, param in global_named_parameters(chunks):
        rule, layer = mapping.match(name)
        if not mapping.exported(rule):
            continue
        full = _gather_tp(param, tp, group) if _is_tp_sharded(param) and tp > 1 else param.detach()
        for hf_name, tensor in zip(rule.hf_names(layer), mapping.to_hf(rule, full, tp)):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)
