"""The one name mapping between megatron-core GPTModel parameters and Hugging Face tensors.

One declarative table per model family (built from the shared dense-decoder rows plus what the family
adds), and the two directions of tensor conversion. The converters, the HF weight loader and the
in-memory export that feeds SGLang's weight sync all go through here.

Megatron full tensors are in "TP-concatenated" layout: what you get by concatenating the TP shards along
the partition dim. QKV is grouped by query group, so that layout equals the TP=1 one; fc1 interleaves
[gate; up] per shard, so it depends on TP (see tensor_ops).
"""
import re
from dataclasses import dataclass

import torch

from checkpoint_tools import tensor_ops
from megatron_opd.models import ModelArch

COPY, VOCAB, QKV, GATE_UP = "copy", "vocab", "qkv", "gate_up"


@dataclass(frozen=True)
class Rule:
    megatron: str  # "{i}" stands for the global layer index
    hf: tuple[str, ...]
    kind: str = COPY

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]


L, H = "decoder.layers.{i}.", "model.layers.{i}."
DENSE_DECODER = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), QKV),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GATE_UP),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB),
)
QKV_BIAS = (
    Rule(L + "self_attention.linear_qkv.bias",
         (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), QKV),
)
QK_NORM = (
    Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
)
MAPPINGS = {
    "llama": DENSE_DECODER,
    "mistral": DENSE_DECODER,
    "qwen2": DENSE_DECODER + QKV_BIAS,
    "qwen3": DENSE_DECODER + QK_NORM,
}
# The Transformer Engine spec fuses the pre-attention/pre-MLP norms into the next linear layer.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


class FamilyMapping:
    """The mapping of one model (family rules, with the output layer tied or not)."""

    def __init__(self, arch: ModelArch):
        self.arch = arch
        rules = MAPPINGS[arch.family]
        if arch.tie_word_embeddings:  # the output layer is the embedding; HF files have no lm_head
            rules = tuple(Rule(r.megatron, ("model.embed_tokens.weight",), VOCAB)
                          if r.megatron == "output_layer.weight" else r for r in rules)
        self.rules = {rule.megatron: rule for rule in rules}

    def match(self, megatron_name: str) -> tuple[Rule, int | None]:
        """Rule and layer index for a global megatron parameter name (local or TE spec)."""
        layer, key = None, megatron_name
        found = _LAYER.match(megatron_name)
        if found:
            layer, suffix = int(found.group(1)), TE_NAMES.get(found.group(2), found.group(2))
            key = L + suffix
        if key not in self.rules:
            raise KeyError(f"no {self.arch.family} mapping for megatron parameter {megatron_name!r}")
        return self.rules[key], layer

    def exported(self, rule: Rule) -> bool:
        """Tied output layers exist on the last stage as a copy of the embedding: not a tensor of their own."""
        return not (self.arch.tie_word_embeddings and rule.megatron == "output_layer.weight")

    def hf_names(self) -> list[str]:
        names = []
        for rule in self.rules.values():
            if not self.exported(rule):
                continue
            layers = range(self.arch.num_layers) if "{i}" in rule.megatron else [None]
            names += [name for layer in layers for name in rule.hf_names(layer)]
        return names

    def to_megatron(self, rule: Rule, hf_tensors: list[torch.Tensor], tp: int, padded_vocab: int) -> torch.Tensor:
        arch = self.arch
        if rule.kind == VOCAB:
            return tensor_ops.pad_vocab(hf_tensors[0], padded_vocab)
        if rule.kind == QKV:
            return tensor_ops.merge_qkv(*hf_tensors, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
        if rule.kind == GATE_UP:
            return tensor_ops.merge_gate_up(*hf_tensors, tp=tp)
        return hf_tensors[0]

    def to_hf(self, rule: Rule, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
        arch = self.arch
        if rule.kind == VOCAB:
            return [tensor_ops.unpad_vocab(full, arch.vocab_size)]
        if rule.kind == QKV:
            return list(tensor_ops.split_qkv(full, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim))
        if rule.kind == GATE_UP:
            return list(tensor_ops.split_gate_up(full, tp=tp))
        return [full]
