"""The embedded engine's generation: the HF model's forward written out as a short, fixed list of tensor ops
per layer (llama, mistral, qwen2, qwen3 and the mixture-of-experts qwen3_moe, mixtral, qwen2_moe), over a KV
cache allocated once per batch: one prefill of the left-padded prompts, then one token per row per step,
until every row has stopped or the budget is spent. On a small model transformers' `generate` spends most of
a step in Python (mask and cache objects, logits processors, per-step bookkeeping); this keeps the
arithmetic and drops the rest.

The arithmetic is the HF model's own (its weights, its RMSNorm formula, its rotary-embedding module, SDPA,
its experts module: `mlp_blocks`), so greedy tokens are `generate`'s and log-probs match its logits to float
rounding. Everything is read from the HF model and its config. Changes of form: the projections' weights are
stored transposed ([in, out], which a small matmul reads about twice as fast on a CPU), q/k/v and gate/up
each as one matrix, and a sliding window is a slice of the cache rather than a mask.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_opd.rollout.mlp_blocks import mlp_block, transposed
from megatron_opd.rollout.token_sampler import TokenSampler

# HF model_type -> where a layer's attention window comes from, as the HF model builds its masks: one
# `sliding_window` for every layer, or per layer from `layer_types` ("sliding_attention"), or none.
FAMILIES = {"llama": None, "mistral": "global", "qwen2": "layer_types", "qwen3": "layer_types",
            "qwen3_moe": "global", "mixtral": "global", "qwen2_moe": "layer_types"}
_ROPE_TYPES = ("default", "llama3")  # static rotary tables; the others change with the length


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    qkv_weight: torch.Tensor  # weights [in, out]
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[torch.Tensor]  # qwen3's per-head norms of q and k, before the rotary embedding
    k_norm: Optional[torch.Tensor]
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    mlp: Callable[[torch.Tensor], torch.Tensor]  # [tokens, hidden] -> [tokens, hidden]: dense or experts
    window: Optional[int]  # keys older than this many positions are not attended to (mistral, mixtral)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The HF formula, op for op (normalised in fp32, rounded to the model's dtype, then scaled): the same
    # numbers as the model's forward, and on a CPU faster than F.rms_norm, which is not fused there.
    x32 = x.float()
    normed = x32 * x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * (normed if x.dtype == normed.dtype else normed.to(x.dtype))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `mask` lets attention through, -inf where not: what SDPA would convert a boolean mask to on
    every call of every decode step."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _decode_mask(visible: torch.Tensor, end: int, window: Optional[int]) -> tuple[int, torch.Tensor]:
    """(first cache position attended, additive mask from there) for a decode step ending at `end`."""
    first = 0 if window is None else max(0, end - window)
    return first, visible[..., first:end]


def _window(config, index: int) -> Optional[int]:
    source = FAMILIES[config.model_type]
    if source == "layer_types":
        return config.sliding_window if config.layer_types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) if source == "global" else None


def _check_supported(config) -> None:
    """Refuses a model the decode loop does not implement, naming what."""
    if config.model_type not in FAMILIES:  # deepseek_v3 among them: its multi-latent attention is not written out
        raise ValueError(f"model_type {config.model_type!r}: the embedded engine's decode loop implements "
                         f"{', '.join(FAMILIES)}; generate with rollout.engine=sglang")
    if config.hidden_act != "silu":
        raise ValueError(f"{config.model_type} with hidden_act={config.hidden_act!r}: the embedded engine's decode "
                         f"loop implements silu MLPs")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"{config.model_type} with rope_type={rope_type!r}: the embedded engine's decode loop "
                         f"implements {', '.join(_ROPE_TYPES)}")


class DecodeLoop:
    """Generation on `model` (a transformers causal LM of a family in FAMILIES), whose projection parameters
    it re-points at its own transposed weights."""

    def __init__(self, model):
        config = model.config
        _check_supported(config)
        inner = model.model
        self.embed, self.head = inner.embed_tokens.weight, model.lm_head.weight
        self.final_norm, self.rotary = inner.norm.weight, inner.rotary_emb
        self.eps = config.rms_norm_eps
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.dtype = self.embed.dtype
        self.layers = [self._layer(layer, config, index) for index, layer in enumerate(inner.layers)]
        self.windows = {layer.window for layer in self.layers}

    @staticmethod
    def _layer(layer, config, index: int) -> _Layer:
        attn = layer.self_attn
        if attn.o_proj.bias is not None:
            raise ValueError(f"{config.model_type} with attention_bias=true: the embedded engine's decode loop "
                             f"implements a bias on q/k/v only")
        qkv_weight, qkv_bias = transposed([attn.q_proj, attn.k_proj, attn.v_proj])
        qk_norm = hasattr(attn, "q_norm")
        return _Layer(input_norm=layer.input_layernorm.weight, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
                      q_norm=attn.q_norm.weight if qk_norm else None, k_norm=attn.k_norm.weight if qk_norm else None,
                      o_weight=transposed([attn.o_proj])[0], post_norm=layer.post_attention_layernorm.weight,
                      mlp=mlp_block(layer.mlp, config), window=_window(config, index))

    def generate(self, input_ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, vocab_size: int,
                 sampler: TokenSampler, stop_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and their log-probs, [rows, steps] each, for left-padded `input_ids` [rows, width] whose
        rows hold `lengths` prompt tokens; logits cover ids below `vocab_size`. Steps stop at max_new_tokens
        (at least 1) or once every row has produced one of `stop_ids`; a row's tokens after its first stop
        are filler."""
        rows, width = input_ids.shape
        device, steps = input_ids.device, max_new_tokens
        head = self.head[:vocab_size]
        shape = (len(self.layers), rows, self.kv_heads, width + steps - 1, self.head_dim)
        cache = [torch.empty(shape, dtype=self.dtype, device=device) for _ in range(2)]  # keys, values
        positions = torch.arange(width + steps - 1, device=device)
        is_prompt = positions[None, :width] >= (width - lengths)[:, None]
        logits = self._logits(self._prefill(input_ids, cache, is_prompt, positions[:width]), head)
        # Keys a decode step sees: the prompts' real tokens, then every generated one.
        visible = _additive(torch.cat([is_prompt, is_prompt.new_ones(rows, steps - 1)], 1)[:, None, None, :],
                            self.dtype)
        cos, sin = self._cos_sin(lengths[:, None] + positions[None, :steps - 1])
        rotations = list(zip(cos[:, :, None, None].unbind(1), sin[:, :, None, None].unbind(1)))
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for step in range(steps):
            token, logprob = sampler(logits)
            tokens.append(token)
            logprobs.append(logprob)
            if stop_ids is not None:
                done |= torch.isin(token, stop_ids)
                if done.all():
                    break
            if step + 1 < steps:
                end = width + step + 1
                masks = {window: _decode_mask(visible, end, window) for window in self.windows}
                logits = self._logits(self._forward(token[:, None], cache, end - 1, rotations[step], masks), head)
        return torch.stack(tokens, 1), torch.stack(logprobs, 1)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cos and sin at `positions`, [*positions.shape, head_dim], with rotate_half's
        sign folded into sin: rotating x is x * cos + roll(x, head_dim / 2) * sin."""
        cos, sin = self.rotary(self.embed, positions)  # reads the dtype and device of its first argument
        half = self.head_dim // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], -1)

    def _prefill(self, input_ids: torch.Tensor, cache, is_prompt: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """The last position's hidden state [rows, hidden], the prompts' keys and values cached."""
        query, key = positions[:, None], positions[None, :]
        # A padding query attends to itself only: its output is never used, but must stay finite, since
        # later layers read its keys and values (with weight zero). Boolean: a quarter of an additive mask's
        # memory ([rows, 1, width, width]); SDPA converts it at each layer of this one call.
        causal = (key <= query) & is_prompt[:, None, None, :] | (key == query)
        masks = {window: (0, causal if window is None else causal & (query - key < window)) for window in self.windows}
        cos, sin = self._cos_sin((is_prompt.cumsum(1) - 1).clamp_min(0))
        hidden = self._forward(input_ids, cache, 0, (cos[:, :, None], sin[:, :, None]), masks)
        return hidden.view(*input_ids.shape, -1)[:, -1]

    def _forward(self, input_ids: torch.Tensor, cache, start: int, rotation, masks) -> torch.Tensor:
        """Hidden states [rows * s, hidden] of `input_ids` [rows, s] at cache positions start.., their keys
        and values written to the cache. Token-wise ops see [tokens, features]: plain matmuls."""
        rows, s = input_ids.shape
        cos, sin = rotation
        heads, head_dim = self.heads, self.head_dim
        qk_width = (heads + self.kv_heads) * head_dim
        hidden = F.embedding(input_ids.view(-1), self.embed)
        for index, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm, self.eps)
            qkv = x @ layer.qkv_weight if layer.qkv_bias is None else torch.addmm(layer.qkv_bias, x, layer.qkv_weight)
            qk = qkv[:, :qk_width].view(rows, s, -1, head_dim)
            if layer.q_norm is not None:
                qk = torch.cat([_rms_norm(qk[:, :, :heads], layer.q_norm, self.eps),
                                _rms_norm(qk[:, :, heads:], layer.k_norm, self.eps)], 2)
            qk = qk * cos + qk.roll(head_dim // 2, -1) * sin
            keys, values = cache[0][index], cache[1][index]
            keys.narrow(2, start, s).copy_(qk[:, :, heads:].transpose(1, 2))
            values.narrow(2, start, s).copy_(qkv[:, qk_width:].view(rows, s, -1, head_dim).transpose(1, 2))
            first, mask = masks[layer.window]
            attended = F.scaled_dot_product_attention(
                qk[:, :, :heads].transpose(1, 2), keys.narrow(2, first, start + s - first),
                values.narrow(2, first, start + s - first), attn_mask=mask, scale=self.scale, enable_gqa=True)
            hidden = hidden + attended.transpose(1, 2).reshape(rows * s, -1) @ layer.o_weight
            hidden = hidden + layer.mlp(_rms_norm(hidden, layer.post_norm, self.eps))
        return hidden

    def _logits(self, hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), head).float()
