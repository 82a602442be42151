"""A converted Megatron checkpoint directory, and building a model for a layout from either format.

    <dir>/opd_checkpoint.json   {"format": "torch_dist", "architecture", "vocab_size", "dtype"}
    <dir>/config.json, generation_config.json, tokenizer files   (carried from the HF source)
    <dir>/model/                megatron dist_checkpointing (torch_dist), loadable at any TP/PP/VPP
"""
import json
import os

from checkpoint_tools.hf_files import INDEX_NAME, SINGLE_NAME, CheckpointFileError
from checkpoint_tools.weights import load_hf_weights
from megatron_opd.models import RouterLoss, build_model, load_arch
from megatron_opd.models.sharded_checkpoint import load_model
from megatron_opd.parallel import ParallelConfig

MARKER = "opd_checkpoint.json"
MODEL_SUBDIR = "model"


def is_mcore_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def is_hf_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in (SINGLE_NAME, INDEX_NAME))


def read_marker(path: str) -> dict:
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointFileError(f"{marker}: unreadable ({err})") from None
    if info.get("format") != "torch_dist":
        raise CheckpointFileError(f"{marker}: format {info.get('format')!r}, expected 'torch_dist'")
    if not os.path.isfile(os.path.join(path, MODEL_SUBDIR, "metadata.json")):
        raise CheckpointFileError(f"{os.path.join(path, MODEL_SUBDIR)}: missing or incomplete torch_dist checkpoint")
    return info


def write_marker(path: str, arch, dtype: str) -> None:
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"format": "torch_dist", "architecture": arch.architecture, "vocab_size": arch.vocab_size,
                   "dtype": dtype}, f, indent=2)


def checkpoint_dtype(path: str) -> str:
    """The dtype a checkpoint holds its weights in: the marker's for a converted checkpoint, config.json's
    torch_dtype for an HF one."""
    return read_marker(path).get("dtype", "float32") if is_mcore_dir(path) else load_arch(path).torch_dtype


def load_pretrained(path: str, parallel: ParallelConfig, dtype=None, recompute: str = "none", pg_collection=None,
                    router_loss: RouterLoss = RouterLoss()):
    """Build the model described by `path` (an HF directory or a converted Megatron checkpoint) for
    `parallel`, in `dtype` (default: the checkpoint's), and load its weights. The model's groups are
    `pg_collection` (a layout of its own) or megatron's initialised global state; it lands on the process
    group's device. `router_loss`: a mixture-of-experts model's router losses (default: none, a frozen model's).
    Returns (arch, chunks)."""
    if not os.path.isdir(path):
        raise CheckpointFileError(f"{path}: no such model directory")
    arch = load_arch(path)
    build = dict(recompute=recompute, init_weights=False, pg_collection=pg_collection, router_loss=router_loss)
    if is_mcore_dir(path):
        chunks = build_model(arch, parallel, dtype=dtype or checkpoint_dtype(path), **build)
        load_model(chunks, os.path.join(path, MODEL_SUBDIR), pg_collection)
    elif is_hf_dir(path):
        chunks = build_model(arch, parallel, dtype=dtype or arch.torch_dtype, **build)
        load_hf_weights(chunks, arch, path, pg_collection=pg_collection)
    else:
        raise CheckpointFileError(f"{path}: neither a Hugging Face checkpoint ({SINGLE_NAME}) nor a converted "
                                  f"Megatron checkpoint ({MARKER})")
    return arch, chunks
