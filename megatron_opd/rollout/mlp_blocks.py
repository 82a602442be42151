"""The decode loop's MLPs over the HF model's own weights: a dense SwiGLU MLP (gate and up as one transposed
matrix) and a mixture-of-experts block (qwen3_moe, mixtral, qwen2_moe).

The MoE block's router is written out per family, as the HF router computes it: softmax over all experts in
fp32, top-k, the top-k weights renormalised iff `norm_topk_prob` (always on Mixtral), cast back to the
model's dtype except on Mixtral. The routed experts run through the HF experts module itself: transformers
5 keeps them fused ([E, 2I, H] gate_up_proj, gate rows then up rows; [E, H, I] down_proj) and dispatches
them to its grouped-matmul kernel, whose arithmetic the decode loop thereby shares with `generate`. Qwen2-MoE
adds a shared expert (a dense MLP) scaled by sigmoid(shared_expert_gate(x)).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def transposed(linears: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One weight [in, sum of outs] (and bias) for linears that read the same input. Their parameters are
    re-pointed at its transposed slices, so the model's forward and in-place weight updates through the
    model's parameter names see and change it."""
    weight = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()
    bias = torch.cat([linear.bias.detach() for linear in linears]) if linears[0].bias is not None else None
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[:, start:start + rows].t(), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


class DenseMlp:
    """down(silu(gate(x)) * up(x)) on [tokens, hidden]."""

    def __init__(self, mlp):
        if any(linear.bias is not None for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError("an MLP with biases (mlp_bias=true): the embedded engine's decode loop implements "
                             "bias-free MLPs")
        self.gate_up = transposed([mlp.gate_proj, mlp.up_proj])[0]
        self.down = transposed([mlp.down_proj])[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up).chunk(2, -1)
        return (F.silu(gate) * up) @ self.down


class MoeBlock:
    """A sparse MLP on [tokens, hidden]: the routed experts' weighted sum, plus the gated shared expert."""

    def __init__(self, mlp, config):
        self.router, self.experts = mlp.gate.weight, mlp.experts
        self.top_k = config.num_experts_per_tok
        mixtral = config.model_type == "mixtral"
        self.renormalise = mixtral or config.norm_topk_prob
        self.cast_back = not mixtral  # Mixtral's router hands the experts fp32 weights
        shared = getattr(mlp, "shared_expert", None)
        self.shared = None if shared is None else DenseMlp(shared)
        self.shared_gate = None if shared is None else transposed([mlp.shared_expert_gate])[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.router)
        weights, experts = logits.softmax(-1, dtype=torch.float).topk(self.top_k, -1)
        if self.renormalise:
            weights /= weights.sum(-1, keepdim=True)
        if self.cast_back:
            weights = weights.to(logits.dtype)
        routed = self.experts(x, experts, weights)
        if self.shared is None:
            return routed
        return routed + torch.sigmoid(x @ self.shared_gate) * self.shared(x)


def mlp_block(mlp, config):
    """The decode loop's block for an HF decoder layer's `mlp` (sparse where the layer has experts: Qwen-MoE's
    `mlp_only_layers` and `decoder_sparse_step` leave some layers dense)."""
    return MoeBlock(mlp, config) if hasattr(mlp, "experts") else DenseMlp(mlp)
