"""Tiny Hugging Face checkpoints of the supported architectures, built locally (no download): the real
transformers model classes at small sizes, random weights, and a BPE tokenizer (byte-level, or SentencePiece
style) trained on the spot. Tests, benchmarks and the CPU demo use them."""
import os
from typing import Iterable, Optional

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
DEFAULT_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "on policy distillation: the student learns from the teacher on its own samples",
    "question: what is 12 plus 30? answer: 12 + 30 = 42 #### 42",
    "natalia sold clips to 48 of her friends in april, and then she sold half as many clips in may.",
]

# Per family: what makes it itself (bias, QK-norm, head_dim != hidden/heads, rope scaling, window, tying).
FAMILY_OVERRIDES = {
    "llama": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0,
        original_max_position_embeddings=64)),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(head_dim=32, rope_theta=1000000.0),
    # Mixture-of-experts: 4 experts, top-2; Qwen3-MoE renormalises the top-k and keeps layer 0 dense, Mixtral
    # has a window, Qwen2-MoE a gated shared expert.
    "qwen3_moe": dict(head_dim=32, rope_theta=1000000.0, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, rope_theta=1000000.0),
    # DeepSeek-V3 as released, small: multi-latent attention (q and kv latents, 8 rotated of 16 q/k dims per
    # head), YaRN with distinct mscales (so the cos/sin and softmax factors both matter), a dense first layer,
    # sigmoid routing over 2 groups of 2 experts (1 group chosen) with a nonzero bias (see `_randomise`),
    # scaled by 2.5, and a shared expert. No multi-token-prediction layer (transformers' default adds one).
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                        topk_group=1, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=0,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32,
                                             beta_slow=1, mscale=0.8, mscale_all_dim=1.0,
                                             original_max_position_embeddings=128)),
}
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def train_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 300, kind: str = "byte_level"):
    """BPE trained on `texts`, with a ChatML chat template: byte-level (GPT-2/Qwen style), or `metaspace`
    (Llama 2/Mistral style: '▁' for a space before a text's first word too, unknown characters as '<0xNN>'
    byte tokens; `vocab_size` counts the merged pieces, the 256 byte tokens come on top)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts or DEFAULT_CORPUS) * 4
    if kind == "byte_level":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(corpus, trainer)
    elif kind == "metaspace":
        tokenizer = _metaspace_tokenizer(corpus, vocab_size)
    else:
        raise ValueError(f"tokenizer kind {kind!r}: byte_level or metaspace")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _metaspace_tokenizer(corpus: list, vocab_size: int):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                              show_progress=False))
    # SentencePiece keeps its byte fallbacks in the model's vocabulary, after the merged pieces
    described = json.loads(tokenizer.to_str())
    vocab = described["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(described))


def tiny_hf_config(family: str, vocab_size: int, **overrides):
    from transformers import (
        DeepseekV3Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
        Qwen3MoeConfig)

    classes = dict(llama=LlamaConfig, mistral=MistralConfig, qwen2=Qwen2Config, qwen3=Qwen3Config,
                   qwen3_moe=Qwen3MoeConfig, mixtral=MixtralConfig, qwen2_moe=Qwen2MoeConfig,
                   deepseek_v3=DeepseekV3Config)
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(classes)}")
    kwargs = dict(TINY_SIZES, vocab_size=vocab_size, **FAMILY_OVERRIDES[family])
    kwargs.update(overrides)
    return classes[family](**kwargs)


@torch.no_grad()
def _randomise(model) -> None:
    """Weights transformers initialises to zero but a trained model has nonzero: DeepSeek-V3's routing bias
    (`e_score_correction_bias`, of the scale of the sigmoid scores' spread, so it changes the choice)."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.05)


def write_tiny_checkpoint(out_dir: str, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                          tokenizer=None, **overrides) -> str:
    """Save a randomly initialised tiny `family` model (safetensors + config + tokenizer) to out_dir. The
    vocabulary is the tokenizer's unless `vocab_size` pads it (as real checkpoints do: rows no token uses)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    vocab_size = overrides.pop("vocab_size", len(tokenizer))
    config = tiny_hf_config(family, vocab_size=vocab_size, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model)
    model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
