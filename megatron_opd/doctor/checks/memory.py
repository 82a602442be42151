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
from megatron_opd.trainer.setup import model_dtype

CHECK = "memory"
WARN_SHARE, FAIL_SHARE = 0.9, 1.0
GIB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4
ADAM_MOMENTS = 2


def layer_parameters(arch) -> int:
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    attention = arch.hidden_size * (q + 2 * kv) + q * arch.hidden_size + (q + 2 * kv) * arch.qkv_bias
    return attention + 3 * arch.hidden_size * arch.intermediate_size + 2 * arch.hidden_size \
        + 2 * arch.head_dim * arch.qk_norm


def rank_parameters(arch, tensor: int, pipeline: int) -> int:
    """Parameters of the fullest rank: its stage's layers and the embedding / output layer, each cut over TP
    (a tied model's last stage keeps a copy of the embedding when PP > 1)."""
    vocab_rows = padded_vocab_size(arch.vocab_size, tensor) * arch.hidden_size
    vocab_layers = 2 if pipeline == 1 and not arch.tie_word_embeddings else 1
    return (-(-arch.num_layers // pipeline) * layer_parameters(arch) + vocab_layers * vocab_rows) // tensor \
        + arch.hidden_size


def whole_parameters(arch) -> int:
    vocab_layers = 1 if arch.tie_word_embeddings else 2
    return arch.num_layers * layer_parameters(arch) + vocab_layers * arch.vocab_size * arch.hidden_size \
        + arch.hidden_size


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
        parts[f"{key} weights (TP={layout.tensor} x PP={layout.pipeline}, {dtype})"] = \
            rank_parameters(arch, layout.tensor, layout.pipeline) * BYTES[dtype]
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
    params = rank_parameters(arch, layout.tensor, layout.pipeline)
    dp = max(world_size // layout.model_parallel_size, 1)
    main_weights = FP32 if dtype == "bfloat16" else 0  # megatron keeps fp32 main weights beside bf16 ones
    parts = {f"student weights ({params:,} parameters, {dtype})": params * BYTES[dtype],
             "student gradients (fp32)": params * FP32,
             f"optimizer state (Adam moments{' + fp32 main weights' if main_weights else ''}, over DP={dp})":
                 params * (ADAM_MOMENTS * FP32 + main_weights) // dp}
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
