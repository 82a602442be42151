import json

import pytest

from megatron_opd.models import UnsupportedArchitectureError, arch_from_dict, load_arch, padded_vocab_size
from megatron_opd.demo.tiny import tiny_hf_config


def _config(family, **overrides):
    cfg = tiny_hf_config(family, vocab_size=300, **overrides).to_dict()
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    return cfg


def test_family_traits(tiny_models):
    llama, mistral, qwen2, qwen3 = (load_arch(tiny_models[f]) for f in ("llama", "mistral", "qwen2", "qwen3"))
    assert llama.rope_scaling.factor == 4.0 and llama.rope_scaling.high_freq_factor == 2.0
    assert llama.rope_scaling.original_max_position_embeddings == 64 and llama.rope_theta == 500000.0
    assert mistral.sliding_window == 8 and not mistral.qkv_bias
    assert qwen2.qkv_bias and qwen2.tie_word_embeddings and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_attention_heads
    assert {a.num_key_value_heads for a in (llama, qwen2, qwen3)} == {2}


def test_legacy_rope_keys_are_read():
    cfg = _config("llama")
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=123.0, rope_scaling=dict(type="llama3", factor=8.0))
    arch = arch_from_dict(cfg)
    assert arch.rope_theta == 123.0 and arch.rope_scaling.factor == 8.0
    assert arch.rope_scaling.original_max_position_embeddings == 8192


def test_unsupported_architecture_lists_the_supported_ones():
    cfg = dict(_config("llama"), architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match=r"'GPTNeoXForCausalLM' is not supported; supported: "
                       r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        arch_from_dict(cfg)


def test_unsupported_rope_scaling_is_named():
    cfg = _config("qwen2")
    cfg["rope_parameters"] = dict(rope_type="yarn", factor=4.0, rope_theta=1e6)
    with pytest.raises(UnsupportedArchitectureError, match=r"rope scaling type 'yarn' is not supported"):
        arch_from_dict(cfg)


def test_missing_key_and_bad_files_are_named(tmp_path):
    cfg = _config("qwen3")
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match=r"missing key 'hidden_size'"):
        arch_from_dict(cfg)
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        load_arch(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_arch(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_config("mistral")))
    assert load_arch(str(tmp_path)).family == "mistral"


@pytest.mark.parametrize("vocab, tp, padded", [(300, 1, 384), (300, 2, 512), (151936, 1, 151936),
                                               (151936, 2, 152064), (128256, 4, 128512)])
def test_vocab_padding(vocab, tp, padded):
    assert padded_vocab_size(vocab, tp) == padded


def test_output_and_mlp_biases_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match=r"LlamaForCausalLM with attention_bias=true"):
        arch_from_dict(dict(_config("llama"), attention_bias=True))
    with pytest.raises(UnsupportedArchitectureError, match=r"with mlp_bias=true"):
        arch_from_dict(dict(_config("llama"), mlp_bias=True))
