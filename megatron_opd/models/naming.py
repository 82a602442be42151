"""Global parameter names for model chunks: decoder layer indices restart at 0 on every pipeline stage
and virtual chunk, so names are made global from each layer's own `layer_number` (1-based, global); an
expert-parallel rank holds experts [r*E/EP, (r+1)*E/EP) as local experts 0.., so their names get the index
among all the layer's experts (the MoE layer's `local_expert_indices`)."""
import re
from typing import Iterator

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_LOCAL_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)")


def global_param_name(chunk, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = chunk.decoder.layers[int(match.group(1))]
    rest = match.group(2)
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        rest = f"{expert.group(1)}{layer.mlp.local_expert_indices[int(expert.group(2))]}{expert.group(3)}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def global_named_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            yield global_param_name(chunk, name), param


def global_named_tensors(chunks) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters, then the checkpoint state that is a buffer: routers' expert bias (DeepSeek-V3's
    routing correction, updated outside the gradient if at all)."""
    yield from global_named_parameters(chunks)
    for chunk in chunks:
        for name, buffer in chunk.named_buffers():
            if name.endswith(".router.expert_bias"):
                yield global_param_name(chunk, name), buffer
