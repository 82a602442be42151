"""DeepSeek-V3 (multi-latent attention, YaRN, sigmoid group-limited routing with an expert bias): its facts
reach megatron's config; the variants megatron cannot reproduce are refused naming the config key; the query
projected without a latent (q_lora_rank null) with plain rope gives transformers' logits too. The tiny model of
conftest's MOE_FAMILIES covers every layout (tests/models/test_moe.py) and the converters."""
import copy
import json
import os
import shutil

import pytest
import torch

from checkpoint_tools.verify import compare, hf_logits, megatron_logits, sample_tokens
from megatron_opd.demo.tiny import write_tiny_checkpoint
from megatron_opd.models import UnsupportedArchitectureError, arch_from_dict, build_model, load_arch
from megatron_opd.models.builder import transformer_config
from megatron_opd.models.hf_config import YarnRopeScaling
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.conftest import run_distributed


@pytest.fixture(scope="module")
def config(tiny_moe_models):
    return json.load(open(os.path.join(tiny_moe_models["deepseek_v3"], "config.json")))


def test_facts_from_config(config):
    arch = arch_from_dict(config)
    assert (arch.mla.q_lora_rank, arch.mla.kv_lora_rank, arch.mla.qk_rope_head_dim, arch.head_dim) == (24, 16, 8, 16)
    assert arch.rope_scaling == YarnRopeScaling(factor=4.0, original_max_position_embeddings=128, mscale=0.8,
                                                mscale_all_dim=1.0)
    moe = arch.moe
    assert moe.moe_layers == (False, True, True, True) and moe.shared_expert_size == 32 and not moe.shared_expert_gated
    assert (moe.score_function, moe.expert_bias, moe.num_groups, moe.group_topk, moe.scaling_factor) == (
        "sigmoid", True, 2, 1, 2.5)


def test_routing_attention_and_yarn_reach_megatron(config):
    c = transformer_config(arch_from_dict(config), ParallelConfig(expert=2))
    assert type(c).__name__ == "MLATransformerConfig" and c.multi_latent_attention and c.qk_layernorm
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (24, 16, 8, 8, 8)
    assert (c.rope_type, c.rotary_scaling_factor, c.original_max_position_embeddings, c.mscale, c.mscale_all_dim) == (
        "yarn", 4.0, 128, 0.8, 1.0)
    assert (c.moe_router_score_function, c.moe_router_enable_expert_bias, c.moe_router_bias_update_rate) == (
        "sigmoid", True, 0.0)
    assert (c.moe_router_num_groups, c.moe_router_group_topk, c.moe_router_topk_scaling_factor) == (2, 1, 2.5)
    one_group = transformer_config(arch_from_dict(dict(config, n_group=1, topk_group=1)), ParallelConfig())
    assert one_group.moe_router_num_groups is None and one_group.moe_router_group_topk is None


def _with(config, **changes):
    changed = copy.deepcopy(config)
    for key, value in changes.items():
        if key.startswith("yarn_"):  # a key of rope_parameters
            changed["rope_parameters"][key[len("yarn_"):]] = value
        else:
            changed[key] = value
    return changed


@pytest.mark.parametrize("changes, message", [
    (dict(rope_interleave=False), r"rope_interleave=false is not supported"),
    (dict(norm_topk_prob=False), r"norm_topk_prob=False is not supported"),
    (dict(n_group=1, num_experts_per_tok=1), r"num_experts_per_tok=1 with norm_topk_prob=True"),
    (dict(num_experts_per_tok=3, n_group=2, topk_group=2), r"num_experts_per_tok=3 with topk_group=2"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2 != num_attention_heads=4"),
    (dict(yarn_attention_factor=1.2), r"yarn rope scaling with attention_factor=1.2"),
    (dict(yarn_truncate=False), r"yarn rope scaling with truncate=False"),
    (dict(yarn_mscale=None), r"yarn rope scaling with mscale_all_dim but no mscale"),
    (dict(quantization_config=dict(quant_method="fp8")), r"quantization_config \(fp8\) is not supported"),
], ids=["rope-not-interleaved", "no-renormalisation", "top-1", "group-ranking", "kv-heads", "attention-factor",
        "no-truncate", "mscale-all-dim-alone", "fp8"])
def test_what_megatron_cannot_reproduce_is_refused(config, changes, message):
    with pytest.raises(UnsupportedArchitectureError, match=message):
        arch_from_dict(_with(config, **changes))


def test_yarn_stays_refused_outside_multi_latent_attention(tiny_models):
    llama = json.load(open(os.path.join(tiny_models["llama"], "config.json")))
    llama["rope_parameters"] = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                    original_max_position_embeddings=128)
    with pytest.raises(UnsupportedArchitectureError, match=r"rope scaling type 'yarn' is not supported"):
        arch_from_dict(llama)


def test_context_parallelism_needs_transformer_engine(tiny_moe_models):
    with pytest.raises(ValueError, match=r"context parallelism \(parallel.context=2\) with multi-latent attention "
                                         r"needs Transformer Engine"):
        build_model(load_arch(tiny_moe_models["deepseek_v3"]), ParallelConfig(context=2), use_te=False)


def test_query_without_latent_and_plain_rope_give_transformers_logits(tiny_tokenizer, tmp_path):
    hf_dir = write_tiny_checkpoint(str(tmp_path / "no_q_lora"), "deepseek_v3", seed=5, tokenizer=tiny_tokenizer,
                                   q_lora_rank=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    arch = load_arch(hf_dir)
    assert arch.mla.q_lora_rank is None and arch.rope_scaling is None
    tokens = sample_tokens(arch.vocab_size)
    parity = compare(hf_logits(hf_dir, tokens), megatron_logits(hf_dir, tokens, ParallelConfig()))
    assert parity.within(1e-5), parity


def test_multi_token_prediction_layers_are_left_unread(tiny_moe_models, tmp_path):
    """Released DeepSeek-V3 files hold a multi-token-prediction layer after the decoder's (model.layers.61):
    transformers skips it, so does the loader; any other unused tensor is still an error."""
    from safetensors.torch import load_file, save_file

    from checkpoint_tools.convert import hf_to_mcore
    from checkpoint_tools.weights import WeightMismatchError
    from tests.checkpoint_tools.test_convert import convert

    hf_dir = str(tmp_path / "with_mtp")
    shutil.copytree(tiny_moe_models["deepseek_v3"], hf_dir)
    tensors = load_file(f"{hf_dir}/model.safetensors")
    save_file(dict(tensors, **{"model.layers.4.eh_proj.weight": torch.zeros(64, 128)}),
              f"{hf_dir}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match=r"1 tensors are not used .*model\.layers\.4\.eh_proj\.weight"):
        convert(hf_to_mcore, hf_dir, str(tmp_path / "refused"))
    config = json.load(open(f"{hf_dir}/config.json"))
    json.dump(dict(config, num_nextn_predict_layers=1), open(f"{hf_dir}/config.json", "w"))
    convert(hf_to_mcore, hf_dir, str(tmp_path / "mcore"))


def _bias_dtype(rank, world_size, hf_dir):
    initialize_model_parallel(ParallelConfig())
    chunks = build_model(load_arch(hf_dir), ParallelConfig(), dtype="bfloat16", init_weights=False)
    return {buffer.dtype for name, buffer in chunks[0].named_buffers() if name.endswith("expert_bias")}


def test_expert_bias_stays_fp32_in_a_bf16_model(tiny_moe_models):
    assert run_distributed(_bias_dtype, 1, tiny_moe_models["deepseek_v3"]) == [{torch.float32}]
