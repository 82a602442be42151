"""Check 7 (on paper): what one rank holds for the run's layout — the student's weights, gradients and
optimizer state, each Megatron teacher's weights, what the loss keeps of the teachers per token, the
rollout engine's copy on rank 0 — against the memory of the device (CUDA: free memory; CPU: MemAvailable,
shared by the node's ranks). Activations are not counted: the figure is a floor."""
import os
from typing import Optional

import torch

from megatron_opd.config import ConfigError, OPDConfig, run_teachers, teacher_key, teacher_layout
from megatron_opd.doctor.report import FAIL, OK, WARN, Finding
from megatron_opd.loss.kinds import FULL_KINDS, TOPK_KINDS
from megatron_opd.models import load_arch, padded_vocab_size
from megatron_opd.parallel import ParallelConfig
from megatron_opd.trainer.setup import model_dtype

CHECK = "memory"
WARN_SHARE, FAIL_SHARE = 0.9, 1.0
GIB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4
ADAM_MOMENTS = 2


def _attention_parameters(arch, tensor: int) -> int:
    """One layer's attention and its norm: the projections cut over TP, the norms whole."""
    if arch.mla is not None:
        return _mla_parameters(arch, tensor)
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    cut = arch.hidden_size * (q + 2 * kv) + q * arch.hidden_size + (q + 2 * kv) * arch.qkv_bias
    return cut // tensor + arch.hidden_size + 2 * arch.head_dim * arch.qk_norm


def _mla_parameters(arch, tensor: int) -> int:
    """Multi-latent attention as megatron's local spec builds it: every projection column- or row-parallel
    (Transformer Engine's spec keeps the two down-projections whole on every TP rank), the latent norms whole."""
    mla, hidden, heads = arch.mla, arch.hidden_size, arch.num_attention_heads
    q_out = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    q = (hidden + q_out) * mla.q_lora_rank if mla.q_lora_rank else hidden * q_out
    cut = (q + hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim)
           + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim) + heads * mla.v_head_dim * hidden)
    return cut // tensor + hidden + (mla.q_lora_rank or 0) + mla.kv_lora_rank


def _mlp_parameters(arch, layer: int, layout: ParallelConfig) -> int:
    """One layer's MLP and its norm. A MoE layer: its router whole, its routed experts spread over the
    expert-parallel ranks and each cut over expert-TP, its shared expert cut over TP (its gate whole)."""
    hidden, moe = arch.hidden_size, arch.moe
    if moe is None or not moe.moe_layers[layer]:
        return 3 * hidden * arch.intermediate_size // layout.tensor + hidden
    shared = 3 * hidden * (moe.shared_expert_size or 0) // layout.tensor + hidden * moe.shared_expert_gated
    return moe.num_experts * hidden + _routed_parameters(arch, layer, layout) + shared + hidden


def _routed_parameters(arch, layer: int, layout: ParallelConfig) -> int:
    """One layer's routed experts on a rank (the optimizer shards them over the expert data-parallel ranks)."""
    moe = arch.moe
    if moe is None or not moe.moe_layers[layer]:
        return 0
    return moe.num_experts // layout.expert * 3 * arch.hidden_size * moe.ffn_hidden_size // layout.expert_tensor_size


def rank_parameters(arch, layout: ParallelConfig, padded: bool = True) -> int:
    """Parameters of the fullest rank: its stage's layers, the first stage's embedding and the last stage's
    output layer (a tied model's last stage keeps a copy of the embedding when PP > 1) and final norm. `padded`:
    the vocabulary as megatron pads it (False: as the HF checkpoint holds it)."""
    rows = padded_vocab_size(arch.vocab_size, layout.tensor) if padded else arch.vocab_size
    vocab = rows * arch.hidden_size // layout.tensor
    per_stage = -(-arch.num_layers // layout.pipeline)
    stages = []
    for stage in range(layout.pipeline):
        layers = range(stage * per_stage, min((stage + 1) * per_stage, arch.num_layers))
        held = sum(_attention_parameters(arch, layout.tensor) + _mlp_parameters(arch, i, layout) for i in layers)
        first, last = stage == 0, stage == layout.pipeline - 1
        tables = first + (last and not (first and arch.tie_word_embeddings))
        stages.append(held + tables * vocab + last * arch.hidden_size)
    return max(stages)


def rank_routed_parameters(arch, layout: ParallelConfig) -> int:
    """The routed experts' share of rank_parameters (the fullest stage's)."""
    per_stage = -(-arch.num_layers // layout.pipeline)
    return max(sum(_routed_parameters(arch, i, layout) for i in range(s * per_stage, min((s + 1) * per_stage,
                                                                                           arch.num_layers)))
               for s in range(layout.pipeline))


def whole_parameters(arch) -> int:
    """As the HF checkpoint holds them: with the routers' expert bias, which megatron keeps as a buffer."""
    moe = arch.moe
    bias = sum(moe.moe_layers) * moe.num_experts if moe is not None and moe.expert_bias else 0
    return rank_parameters(arch, ParallelConfig(), padded=False) + bias


def available(device: torch.device, world_size: int) -> tuple[int, str]:
    """(bytes one rank may use, where that figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return kib * 1024 // ranks, f"MemAvailable / {ranks} rank(s) on this host"


def _teacher_parts(cfg: OPDConfig, tokens: int) -> dict:
    parts = {}
    kind = cfg.actor.kl_loss_type
    for name, teacher in run_teachers(cfg).items():
        key = teacher_key(cfg, name)
        if teacher.engine == "sglang":
            parts[f"{key}: on its own server"] = 0
            continue
        arch, dtype = load_arch(teacher.path), model_dtype(teacher, key)
        layout = teacher_layout(cfg, teacher) or cfg.parallel
        experts = f" x EP={layout.expert}" if arch.moe else ""
        parts[f"{key} weights (TP={layout.tensor} x PP={layout.pipeline}{experts}, {dtype})"] = \
            rank_parameters(arch, layout) * BYTES[dtype]
        if kind in FULL_KINDS:
            rows = padded_vocab_size(load_arch(cfg.student.path).vocab_size, cfg.parallel.tensor) // cfg.parallel.tensor
            parts[f"{key} output layer on the student's shard"] = rows * arch.hidden_size * BYTES[dtype]
            parts[f"{key} hidden states kept for the loss ({arch.hidden_size} a token)"] = \
                tokens * arch.hidden_size * BYTES[dtype]
    if kind in TOPK_KINDS:
        parts[f"teacher top-{cfg.actor.topk} kept for the loss"] = tokens * cfg.actor.topk * (8 + FP32)
    elif kind not in FULL_KINDS:
        parts["teacher log-prob kept for the loss (1 a token)"] = tokens * FP32
    return parts


def rank_bytes(cfg: OPDConfig, world_size: int, device_bytes: Optional[int] = None) -> dict:
    """name -> bytes on the fullest rank (rank 0, which also holds the engine)."""
    arch, dtype = load_arch(cfg.student.path), model_dtype(cfg.student, "student")
    layout = cfg.parallel
    params = rank_parameters(arch, layout)
    dp = max(world_size // layout.model_parallel_size, 1)
    routed = rank_routed_parameters(arch, layout)
    expert_dp = max(world_size // (layout.pipeline * layout.expert * layout.expert_tensor_size), 1)
    main_weights = FP32 if dtype == "bfloat16" else 0  # megatron keeps fp32 main weights beside bf16 ones
    over = f"DP={dp}" + (f", its experts' over expert-DP={expert_dp}" if arch.moe else "")
    parts = {f"student weights ({params:,} parameters, {dtype})": params * BYTES[dtype],
             "student gradients (fp32)": params * FP32,
             f"optimizer state (Adam moments{' + fp32 main weights' if main_weights else ''}, over {over})":
                 ((params - routed) // dp + routed // expert_dp) * (ADAM_MOMENTS * FP32 + main_weights)}
    tokens = cfg.data.train_batch_size * cfg.rollout.n * (cfg.data.max_prompt_length + cfg.rollout.response_length)
    tokens = -(-tokens // dp)
    if cfg.trainer.mode == "distill":
        parts.update(_teacher_parts(cfg, tokens))
    if cfg.rollout.engine == "local":
        parts[f"embedded engine's copy of the student (rank 0, {dtype})"] = whole_parameters(arch) * BYTES[dtype]
    elif cfg.rollout.sglang.colocated and device_bytes is not None:
        share = cfg.rollout.sglang.mem_fraction_static or 0.0
        parts[f"co-located SGLang engine (rollout.sglang.mem_fraction_static={share})"] = int(share * device_bytes)
    return parts


def check_memory(cfg: OPDConfig, world_size: int, device: torch.device) -> list:
    try:
        have, where = available(device, world_size)
        parts = rank_bytes(cfg, world_size, have)
    except (ConfigError, OSError, ValueError) as err:
        return [Finding(CHECK, FAIL, f"could not size the models: {err}")]
    need = sum(parts.values())
    share = need / have if have else float("inf")
    listed = ", ".join(f"{name} {size / GIB:.3g} GiB" for name, size in parts.items() if size)
    summary = (f"{need / GIB:.3g} GiB per rank on paper ({share:.0%} of {have / GIB:.3g} GiB, {where}; "
               f"world size {world_size}, activations not counted): {listed}")
    details = {"need_bytes": need, "available_bytes": have, "share": share, "parts": parts,
               "world_size": world_size}
    if share > FAIL_SHARE:
        return [Finding(CHECK, FAIL, f"{summary}. Does not fit: raise parallel.tensor / parallel.pipeline, give the "
                                     f"teacher its own layout (teacher.parallel.tensor) or serve it "
                                     f"(teacher.engine=sglang), or use more ranks (DP shards the optimizer)",
                    details=details)]
    if share > WARN_SHARE:
        return [Finding(CHECK, WARN, f"{summary}. Above {WARN_SHARE:.0%} before activations: shorten "
                                     f"data.max_prompt_length / rollout.response_length or spread the models wider",
                        details=details)]
    return [Finding(CHECK, OK, summary, details=details)]
