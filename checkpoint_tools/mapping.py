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
EVERY, DENSE, MOE = "every", "dense", "moe"  # the decoder layers a "{i}" rule applies to


@dataclass(frozen=True)
class Rule:
    megatron: str  # "{i}" stands for the global layer index, "{e}" for the global expert index
    hf: tuple[str, ...]
    kind: str = COPY
    layers: str = EVERY

    def hf_names(self, index: dict) -> list[str]:
        return [name.format(**index) for name in self.hf]

    @property
    def expert(self) -> bool:
        """A routed expert's weight: sharded over expert parallelism and expert-TP, not the dense TP."""
        return "{e}" in self.megatron


L, H = "decoder.layers.{i}.", "model.layers.{i}."
X = L + "mlp.experts.local_experts.{e}."  # megatron's SequentialMLP experts (local spec, and TE's without grouped GEMM)
DENSE_DECODER = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), QKV),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GATE_UP, DENSE),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), layers=DENSE),
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


def routed_experts(block: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """The router and the per-expert gated MLPs of an HF sparse-MoE block at `block` (under the layer)."""
    expert = H + block + ".experts.{e}."
    return (
        Rule(L + "mlp.router.weight", (H + block + ".gate.weight",), layers=MOE),
        Rule(X + "linear_fc1.weight", (expert + gate, expert + up), GATE_UP, MOE),
        Rule(X + "linear_fc2.weight", (expert + down,), layers=MOE),
    )


QWEN_EXPERTS = routed_experts("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
GATED_SHARED_EXPERT = (
    Rule(L + "mlp.shared_experts.linear_fc1.weight",
         (H + "mlp.shared_expert.gate_proj.weight", H + "mlp.shared_expert.up_proj.weight"), GATE_UP, MOE),
    Rule(L + "mlp.shared_experts.linear_fc2.weight", (H + "mlp.shared_expert.down_proj.weight",), layers=MOE),
    Rule(L + "mlp.shared_experts.gate_weight", (H + "mlp.shared_expert_gate.weight",), layers=MOE),
)
A = L + "self_attention.", H + "self_attn."
# Multi-latent attention: every linear is megatron's plain (column- or row-parallel) linear over HF's, so
# each is a copy (TP shards: the rows of the column-parallel ones, as the loader chunks any sharded weight).
Q_LORA = (
    Rule(A[0] + "linear_q_down_proj.weight", (A[1] + "q_a_proj.weight",)),
    Rule(A[0] + "q_layernorm.weight", (A[1] + "q_a_layernorm.weight",)),
    Rule(A[0] + "linear_q_up_proj.weight", (A[1] + "q_b_proj.weight",)),
)
Q_DIRECT = (Rule(A[0] + "linear_q_proj.weight", (A[1] + "q_proj.weight",)),)  # q_lora_rank null
MLA = (
    Rule(A[0] + "linear_kv_down_proj.weight", (A[1] + "kv_a_proj_with_mqa.weight",)),
    Rule(A[0] + "kv_layernorm.weight", (A[1] + "kv_a_layernorm.weight",)),
    Rule(A[0] + "linear_kv_up_proj.weight", (A[1] + "kv_b_proj.weight",)),
)
DEEPSEEK_MOE = routed_experts("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + (
    Rule(L + "mlp.router.expert_bias", (H + "mlp.gate.e_score_correction_bias",), layers=MOE),  # a buffer
    Rule(L + "mlp.shared_experts.linear_fc1.weight",
         (H + "mlp.shared_experts.gate_proj.weight", H + "mlp.shared_experts.up_proj.weight"), GATE_UP, MOE),
    Rule(L + "mlp.shared_experts.linear_fc2.weight", (H + "mlp.shared_experts.down_proj.weight",), layers=MOE),
)
MAPPINGS = {
    "llama": DENSE_DECODER,
    "mistral": DENSE_DECODER,
    "qwen2": DENSE_DECODER + QKV_BIAS,
    "qwen3": DENSE_DECODER + QK_NORM,
    "qwen3_moe": DENSE_DECODER + QK_NORM + QWEN_EXPERTS,
    # transformers saves Mixtral's experts under their original names: w1 gate, w3 up, w2 down.
    "mixtral": DENSE_DECODER + routed_experts("block_sparse_moe", "w1.weight", "w3.weight", "w2.weight"),
    "qwen2_moe": DENSE_DECODER + QKV_BIAS + QWEN_EXPERTS + GATED_SHARED_EXPERT,
    "deepseek_v3": tuple(r for r in DENSE_DECODER if ".linear_qkv." not in r.megatron) + Q_LORA + Q_DIRECT + MLA
    + DEEPSEEK_MOE,
}
# The Transformer Engine spec fuses the pre-attention/pre-MLP norms into the next linear layer.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",  # MLA
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class FamilyMapping:
    """The mapping of one model (family rules, with the output layer tied or not)."""

    def __init__(self, arch: ModelArch):
        self.arch = arch
        rules = MAPPINGS[arch.family]
        if arch.tie_word_embeddings:  # the output layer is the embedding; HF files have no lm_head
            rules = tuple(Rule(r.megatron, ("model.embed_tokens.weight",), VOCAB)
                          if r.megatron == "output_layer.weight" else r for r in rules)
        if arch.mla is not None:  # the query through a low-rank latent, or projected directly
            unused = Q_DIRECT if arch.mla.q_lora_rank else Q_LORA
            rules = tuple(r for r in rules if r not in unused)
        self.rules = {rule.megatron: rule for rule in rules}

    def match(self, megatron_name: str) -> tuple[Rule, dict]:
        """Rule and its indices ({"i": layer, "e": expert}, those it has) for a global megatron parameter
        name (local or TE spec)."""
        index, key = {}, megatron_name
        found = _LAYER.match(megatron_name)
        if found:
            index["i"], suffix = int(found.group(1)), TE_NAMES.get(found.group(2), found.group(2))
            expert = _EXPERT.match(suffix)
            if expert:
                index["e"], suffix = int(expert.group(2)), expert.group(1) + "{e}" + expert.group(3)
            key = L + suffix
        if key not in self.rules:
            raise KeyError(f"no {self.arch.family} mapping for megatron parameter {megatron_name!r}")
        return self.rules[key], index

    def ignored(self, hf_name: str) -> bool:
        """HF tensors the model does not use: DeepSeek-V3's multi-token-prediction layers, numbered after the
        decoder's (transformers skips them on load too)."""
        layer = _HF_LAYER.match(hf_name)
        mtp = bool(self.arch.hf_config.get("num_nextn_predict_layers"))
        return mtp and layer is not None and int(layer.group(1)) >= self.arch.num_layers

    def exported(self, rule: Rule) -> bool:
        """Tied output layers exist on the last stage as a copy of the embedding: not a tensor of their own."""
        return not (self.arch.tie_word_embeddings and rule.megatron == "output_layer.weight")

    def layers(self, rule: Rule) -> list[int]:
        moe = self.arch.moe
        routed = moe.moe_layers if moe else (False,) * self.arch.num_layers
        return [i for i, is_moe in enumerate(routed) if rule.layers == EVERY or is_moe == (rule.layers == MOE)]

    def hf_names(self) -> list[str]:
        names = []
        for rule in self.rules.values():
            if not self.exported(rule):
                continue
            layers = self.layers(rule) if "{i}" in rule.megatron else [None]
            experts = range(self.arch.moe.num_experts) if rule.expert else [None]
            names += [name for i in layers for e in experts for name in rule.hf_names(dict(i=i, e=e))]
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
