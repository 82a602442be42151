"""HF <-> Megatron conversion, in one process at TP=1/PP=1 (the torch_dist output reshards on load).

Memory: one copy of the model (the megatron one) plus at most one HF tensor (HF -> Megatron) or one
output shard (Megatron -> HF). Output goes to `<out>.tmp` and is renamed at the end, so a failed
conversion leaves nothing at `<out>`.
"""
import contextlib
import os
import shutil

from checkpoint_tools.hf_files import METADATA_FILES, write_hf_dir
from checkpoint_tools.pretrained import MODEL_SUBDIR, read_marker, write_marker
from checkpoint_tools.weights import export_hf_tensors, load_hf_weights
from megatron_opd.atomic import replaced_when_done
from megatron_opd.models import build_model, load_arch
from megatron_opd.models.sharded_checkpoint import load_model, save_model
from megatron_opd.parallel import ParallelConfig, destroy, free_port, init_distributed, initialize_model_parallel
from megatron_opd.parallel.launch_env import LaunchEnv

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@contextlib.contextmanager
def single_process_model_parallel():
    """A one-process group with megatron's parallel state at TP=PP=1 (unless the caller has one)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        init_distributed(launch=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    initialize_model_parallel(ParallelConfig())
    try:
        yield
    finally:
        if owned:
            destroy()


def _refuse_existing(out_dir: str) -> None:
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir}: output directory already exists; remove it or choose another --out")


def _copy_metadata(src_dir: str, dst_dir: str) -> None:
    for name in METADATA_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def _dtype_name(arch) -> str:
    return {"bfloat16": "bfloat16", "bf16": "bfloat16"}.get(arch.torch_dtype, "float32")


def hf_to_mcore(hf_dir: str, out_dir: str) -> str:
    arch = load_arch(hf_dir)
    _refuse_existing(out_dir)
    shutil.rmtree(f"{out_dir}.tmp", ignore_errors=True)  # left by a conversion that was killed
    with replaced_when_done(out_dir) as tmp_dir:
        os.makedirs(tmp_dir)
        with single_process_model_parallel():
            chunks = build_model(arch, ParallelConfig(), dtype=_dtype_name(arch), init_weights=False)
            load_hf_weights(chunks, arch, hf_dir)
            save_model(chunks, os.path.join(tmp_dir, MODEL_SUBDIR))
        _copy_metadata(hf_dir, tmp_dir)
        write_marker(tmp_dir, arch, _dtype_name(arch))
    return out_dir


def _write_generation_config(src_dir: str, dst_dir: str) -> None:
    if os.path.isfile(os.path.join(dst_dir, "generation_config.json")):
        return
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(src_dir)).save_pretrained(dst_dir)


def mcore_to_hf(mcore_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    info = read_marker(mcore_dir)
    arch = load_arch(mcore_dir)
    _refuse_existing(out_dir)
    with single_process_model_parallel():
        chunks = build_model(arch, ParallelConfig(), dtype=info.get("dtype", "float32"), init_weights=False)
        load_model(chunks, os.path.join(mcore_dir, MODEL_SUBDIR))
        write_hf_dir(export_hf_tensors(chunks, arch), out_dir, mcore_dir, max_shard_bytes)
    _write_generation_config(mcore_dir, out_dir)
    return out_dir
