"""HF -> Megatron -> HF is bit-exact for every family in fp32 and bf16; converted models give
transformers' logits in every layout; a checkpoint written at TP=2 holds the same weights; bad input
fails with a message and leaves nothing behind."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf
from checkpoint_tools.hf_files import CheckpointFileError
from checkpoint_tools.pretrained import load_pretrained
from checkpoint_tools.verify import compare, hf_logits, megatron_logits, sample_tokens
from checkpoint_tools.weights import WeightMismatchError
from megatron_opd.models import UnsupportedArchitectureError
from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.conftest import FAMILIES, run_distributed

_converted = {}


def _in_worker(rank, world_size, fn, *args):
    try:
        return fn(*args), None
    except Exception as err:
        return None, err


def convert(fn, *args):
    """Run a conversion in a forked one-process group (as the CLI does in its own process); its
    exception, if any, is raised here as itself."""
    result, error = run_distributed(_in_worker, 1, fn, *args)[0]
    if error is not None:
        raise error
    return result


def hf_tensors(hf_dir):
    tensors = {}
    for file in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(hf_dir, file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def converted(family, tiny_models, tmp_path_factory):
    if family not in _converted:
        out = str(tmp_path_factory.mktemp(f"mcore_{family}") / "mcore")
        _converted[family] = convert(hf_to_mcore, tiny_models[family], out)
    return _converted[family]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, dtype, tiny_models, tiny_tokenizer, tmp_path):
    source = tiny_models[family] if dtype == torch.float32 else write_tiny_checkpoint(
        str(tmp_path / "hf_bf16"), family, seed=5, dtype=dtype, tokenizer=tiny_tokenizer)
    mcore = convert(hf_to_mcore, source, str(tmp_path / "mcore"))
    back = convert(mcore_to_hf, mcore, str(tmp_path / "hf_back"), 64 * 1024)  # small shards: index path too
    original, round_trip = hf_tensors(source), hf_tensors(back)
    assert sorted(round_trip) == sorted(original)
    for name, tensor in original.items():
        assert round_trip[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(round_trip[name], tensor), name
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(back, name)), name
    assert json.load(open(os.path.join(back, "config.json")))["vocab_size"] == len(tiny_tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_in_every_layout(family, tiny_models, tmp_path_factory):
    mcore = converted(family, tiny_models, tmp_path_factory)
    tokens = sample_tokens(len(hf_tensors(tiny_models[family])["model.embed_tokens.weight"]))
    reference = hf_logits(tiny_models[family], tokens)
    layouts = [ParallelConfig(), ParallelConfig(tensor=2), ParallelConfig(pipeline=2)]
    if family == "qwen3":
        layouts.append(ParallelConfig(tensor=2, pipeline=2))
    for layout in layouts:
        parity = compare(reference, megatron_logits(mcore, tokens, layout))
        assert parity.within(1e-4), (layout, parity)


def _save_at_tp2(rank, world_size, hf_dir, out_dir):
    from checkpoint_tools.hf_files import METADATA_FILES
    from checkpoint_tools.pretrained import MODEL_SUBDIR, write_marker
    from megatron_opd.models.sharded_checkpoint import save_model

    parallel = ParallelConfig(tensor=2)
    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(hf_dir, parallel)
    save_model(chunks, os.path.join(out_dir, MODEL_SUBDIR))
    if rank == 0:
        for name in METADATA_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), out_dir)
        write_marker(out_dir, arch, "float32")


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2_with_identical_logits(tiny_models, tmp_path_factory):
    hf_dir = tiny_models["qwen2"]
    saved_at_tp2 = str(tmp_path_factory.mktemp("tp2") / "mcore")
    run_distributed(_save_at_tp2, 2, hf_dir, saved_at_tp2)
    converted_at_tp1 = converted("qwen2", tiny_models, tmp_path_factory)
    tokens = sample_tokens(len(hf_tensors(hf_dir)["model.embed_tokens.weight"]))
    for layout in (ParallelConfig(), ParallelConfig(pipeline=2)):
        assert torch.equal(megatron_logits(saved_at_tp2, tokens, layout),
                           megatron_logits(converted_at_tp1, tokens, layout)), layout


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_unsupported_architecture_names_the_supported_ones(tiny_models, tmp_path):
    hf_dir = _copy(tiny_models["llama"], tmp_path / "neox")
    _edit_config(hf_dir, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match=r"supported: LlamaForCausalLM, MistralForCausalLM"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "out"))


def test_missing_and_corrupt_files_are_named(tiny_models, tmp_path):
    hf_dir = _copy(tiny_models["llama"], tmp_path / "hf")
    weights = os.path.join(hf_dir, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointFileError, match=r"model.safetensors: .* lies beyond the end of the file; the file is truncated"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "out_corrupt"))
    with open(weights, "wb") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointFileError, match=r"model.safetensors: unreadable safetensors file"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "out_garbage"))
    os.remove(weights)
    with pytest.raises(CheckpointFileError, match=r"no model.safetensors or model.safetensors.index.json"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "out_missing"))
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        convert(hf_to_mcore, str(tmp_path), str(tmp_path / "out_noconfig"))
    with pytest.raises(CheckpointFileError, match=r"opd_checkpoint.json: unreadable"):
        convert(mcore_to_hf, hf_dir, str(tmp_path / "out_notmcore"))
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_config_and_weights_that_disagree(tiny_models, tiny_tokenizer, tmp_path):
    three_layers = write_tiny_checkpoint(str(tmp_path / "three"), "qwen3", tokenizer=tiny_tokenizer,
                                         num_hidden_layers=3)
    _edit_config(three_layers, num_hidden_layers=4)
    with pytest.raises(WeightMismatchError, match=r"weights lack model.layers.3.input_layernorm.weight.*num_hidden_layers=4"):
        convert(hf_to_mcore, three_layers, str(tmp_path / "out"))
    _edit_config(three_layers, num_hidden_layers=2)
    with pytest.raises(WeightMismatchError, match=r"tensors are not used .*model.layers.2"):
        convert(hf_to_mcore, three_layers, str(tmp_path / "out"))
    _edit_config(three_layers, num_hidden_layers=3, hidden_size=32)
    with pytest.raises(WeightMismatchError, match=r"config implies"):
        convert(hf_to_mcore, three_layers, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp")


def test_existing_output_directory_is_refused(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"output directory already exists"):
        convert(hf_to_mcore, tiny_models["llama"], str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
