"""Global parameter names for model chunks: decoder layer indices restart at 0 on every pipeline stage
and virtual chunk, so names are made global from each layer's own `layer_number` (1-based, global)."""
import re
from typing import Iterator

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def global_param_name(chunk, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def global_named_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            yield global_param_name(chunk, name), param
