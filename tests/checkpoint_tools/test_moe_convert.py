"""Mixture-of-experts checkpoints: HF -> Megatron -> HF is bit-exact for every MoE family; a torch_dist
checkpoint written in one process loads at EP=2, and one written at EP=2 in one process, with transformers'
logits; the streaming export gathers every expert from any layout; layouts and architectures that cannot run
are refused."""
import json
import os
import shutil

import pytest
import torch

from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf
from checkpoint_tools.mapping import FamilyMapping
from checkpoint_tools.pretrained import load_pretrained
from checkpoint_tools.verify import compare, hf_logits, megatron_logits, sample_tokens
from checkpoint_tools.weights import export_hf_tensors
from megatron_opd.models import UnsupportedArchitectureError, build_model, load_arch
from megatron_opd.parallel import ParallelConfig, ParallelConfigError, initialize_model_parallel
from tests.checkpoint_tools.test_convert import convert, hf_tensors
from tests.conftest import MOE_FAMILIES, run_distributed


def _assert_same_tensors(original: dict, other: dict):
    assert sorted(other) == sorted(original)
    for name, tensor in original.items():
        assert other[name].dtype == tensor.dtype, name
        assert torch.equal(other[name], tensor), name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_round_trip_is_bit_exact(family, tiny_moe_models, tmp_path):
    source = tiny_moe_models[family]
    mcore = convert(hf_to_mcore, source, str(tmp_path / "mcore"))
    back = convert(mcore_to_hf, mcore, str(tmp_path / "hf_back"))
    original = hf_tensors(source)
    assert sorted(FamilyMapping(load_arch(source)).hf_names()) == sorted(original)
    _assert_same_tensors(original, hf_tensors(back))
    if family == "qwen2_moe":  # the torch_dist checkpoint written in one process, read at EP=2
        tokens = sample_tokens(load_arch(source).vocab_size)
        parity = compare(hf_logits(source, tokens), megatron_logits(mcore, tokens, ParallelConfig(expert=2)))
        assert parity.within(1e-5), parity


def _save_at_ep2(rank, world_size, hf_dir, out_dir):
    from checkpoint_tools.pretrained import MODEL_SUBDIR, write_marker
    from megatron_opd.models.sharded_checkpoint import save_model

    parallel = ParallelConfig(expert=2)
    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(hf_dir, parallel)
    save_model(chunks, os.path.join(out_dir, MODEL_SUBDIR))
    if rank == 0:
        shutil.copy(os.path.join(hf_dir, "config.json"), out_dir)
        write_marker(out_dir, arch, "float32")


def test_checkpoint_saved_at_ep2_loads_in_one_process(tiny_moe_models, tmp_path):
    hf_dir, saved = tiny_moe_models["mixtral"], str(tmp_path / "mcore")
    run_distributed(_save_at_ep2, 2, hf_dir, saved)
    tokens = sample_tokens(load_arch(hf_dir).vocab_size)
    parity = compare(hf_logits(hf_dir, tokens), megatron_logits(saved, tokens, ParallelConfig()))
    assert parity.within(1e-5), parity


def _export(rank, world_size, hf_dir, parallel):
    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(hf_dir, parallel)
    return dict(export_hf_tensors(chunks, arch))


@pytest.mark.parametrize("family, layout", [
    ("qwen3_moe", ParallelConfig(expert=2)), ("qwen2_moe", ParallelConfig(tensor=2)),
    ("mixtral", ParallelConfig(tensor=2, expert=2, expert_tensor=1)),
    ("deepseek_v3", ParallelConfig(tensor=2, expert=2, expert_tensor=1))],
    ids=["ep2", "tp2", "tp2-ep2-etp1", "deepseek-tp2-ep2-etp1"])
def test_export_gathers_every_expert_from_any_layout(family, layout, tiny_moe_models):
    hf_dir = tiny_moe_models[family]
    original = hf_tensors(hf_dir)
    for exported in run_distributed(_export, 2, hf_dir, layout):
        _assert_same_tensors(original, exported)  # every rank of the stage yields the whole model


def test_experts_that_do_not_divide_by_expert_parallelism_are_refused(tiny_moe_models):
    arch = load_arch(tiny_moe_models["mixtral"])
    with pytest.raises(ParallelConfigError, match=r"4 experts per layer do not divide by parallel.expert=3"):
        build_model(arch, ParallelConfig(expert=3))


def test_unsupported_moe_architecture_lists_the_supported_families(tiny_moe_models, tmp_path):
    hf_dir = str(tmp_path / "dbrx")
    shutil.copytree(tiny_moe_models["qwen3_moe"], hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    config = json.load(open(config_path))
    json.dump(dict(config, architectures=["DbrxForCausalLM"]), open(config_path, "w"))
    with pytest.raises(UnsupportedArchitectureError, match=r"'DbrxForCausalLM' is not supported; supported: "
                       r".*Qwen3MoeForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, DeepseekV3ForCausalLM"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
