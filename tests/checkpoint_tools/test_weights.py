"""The streaming export (what the rollout weight sync sends) gives back the HF tensors bit-exactly from
any layout, and the HF loader fills any layout."""
import pytest
import torch

from checkpoint_tools.pretrained import load_pretrained
from checkpoint_tools.verify import compare, hf_logits, megatron_logits, sample_tokens
from checkpoint_tools.weights import export_hf_tensors
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.checkpoint_tools.test_convert import hf_tensors
from tests.conftest import run_distributed


def _export(rank, world_size, hf_dir, parallel):
    from megatron.core import parallel_state

    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(hf_dir, parallel)
    exported = dict(export_hf_tensors(chunks, arch))
    return exported if parallel_state.get_tensor_model_parallel_rank() == 0 else {}


@pytest.mark.parametrize("family, layout", [
    ("qwen2", ParallelConfig(tensor=2)), ("qwen3", ParallelConfig(tensor=2, pipeline=2)),
    ("llama", ParallelConfig(pipeline=2, virtual_pipeline=2)),
])
def test_export_from_any_layout_is_bit_exact(family, layout, tiny_models):
    world = layout.tensor * layout.pipeline
    exported = {}
    for part in run_distributed(_export, world, tiny_models[family], layout):
        exported.update(part)
    original = hf_tensors(tiny_models[family])
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_hf_directory_loads_directly_at_tp2_pp2(tiny_models):
    hf_dir = tiny_models["mistral"]
    tokens = sample_tokens(len(hf_tensors(hf_dir)["model.embed_tokens.weight"]))
    parity = compare(hf_logits(hf_dir, tokens), megatron_logits(hf_dir, tokens, ParallelConfig(tensor=2, pipeline=2)))
    assert parity.within(1e-4), parity


@pytest.mark.parametrize("kv_heads, layout", [(4, ParallelConfig(tensor=2)), (1, ParallelConfig(pipeline=2))],
                         ids=["mha-tp2", "mqa-pp2"])
def test_any_query_group_count(kv_heads, layout, tiny_tokenizer, tmp_path):
    from megatron_opd.demo.tiny import write_tiny_checkpoint

    hf_dir = write_tiny_checkpoint(str(tmp_path / "hf"), "llama", tokenizer=tiny_tokenizer, num_key_value_heads=kv_heads)
    tokens = sample_tokens(len(tiny_tokenizer))
    parity = compare(hf_logits(hf_dir, tokens), megatron_logits(hf_dir, tokens, layout))
    assert parity.within(1e-4), parity
