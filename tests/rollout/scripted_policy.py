"""A stand-in policy on a real checkpoint: the tiny Qwen2 (tied embeddings) rewritten so that its next token
depends on the current token alone, through a given chain (a -> b), with a logit margin of 80: any engine
that serves it, at any temperature up to 1, writes the chain's turns and nothing else.

How: attention and every MLP but layer 0's write nothing (zero output projections); the chain's tokens embed
as orthogonal vectors s * u_j and every other token as 0; unit i of layer 0's MLP fires on token a_i only and
turns the residual s * u_a into s * u_b; the tied output layer then gives b the logit sqrt(H) * s and every
other token 0."""
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

SCALE = 10.0
GATE = 4.0


def scripted_checkpoint(source: str, out: str, chain: dict[int, int]) -> str:
    """`source` (an HF tiny Qwen2 directory) rewritten into `out` so that token a is always followed by
    chain[a]."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    embed = weights["model.embed_tokens.weight"]
    hidden = embed.shape[1]
    tokens = sorted(set(chain) | set(chain.values()))
    assert len(tokens) <= hidden and len(chain) <= weights["model.layers.0.mlp.gate_proj.weight"].shape[0]
    basis = {token: j for j, token in enumerate(tokens)}
    embed.zero_()
    for token, j in basis.items():
        embed[token, j] = SCALE
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", "gate_proj.weight", "up_proj.weight")):
            tensor.zero_()
        elif name.endswith("norm.weight"):
            tensor.fill_(1.0)
    gate, up = weights["model.layers.0.mlp.gate_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"]
    down = weights["model.layers.0.mlp.down_proj.weight"]
    root = math.sqrt(hidden)  # RMSNorm turns s * u_a into sqrt(H) * u_a
    unit_output = torch.nn.functional.silu(torch.tensor(GATE * root)).item() * root
    for i, (a, b) in enumerate(chain.items()):
        gate[i, basis[a]] = GATE
        up[i, basis[a]] = 1.0
        down[basis[b], i] += SCALE / unit_output
        down[basis[a], i] -= SCALE / unit_output
    save_file(weights, path, metadata={"format": "pt"})
    return out
