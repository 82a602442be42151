"""The memory check's parameter count on paper (doctor/checks/memory.py) equals the parameters megatron builds on
the fullest rank, for dense and mixture-of-experts models in every layout: TP, PP, EP, TP x EP with whole
experts; and its routed experts' share (what the optimizer shards over the expert data-parallel ranks) equals
the built experts'."""
import pytest

from megatron_opd.doctor.checks.memory import rank_parameters, rank_routed_parameters, whole_parameters
from megatron_opd.models import load_arch
from megatron_opd.parallel import ParallelConfig
from tests.conftest import MOE_FAMILIES, run_distributed

LAYOUTS = {"one": (ParallelConfig(), 1), "dp2": (ParallelConfig(), 2), "tp2": (ParallelConfig(tensor=2), 2),
           "pp2": (ParallelConfig(pipeline=2), 2), "ep2": (ParallelConfig(expert=2), 2),
           "tp2-ep2-etp1": (ParallelConfig(tensor=2, expert=2, expert_tensor=1), 2)}


def _built(rank, world_size, paths, layouts):
    """{(model, layout): (parameters, routed-expert parameters)} this rank holds."""
    from megatron_opd.models.builder import build_model
    from megatron_opd.parallel import initialize_model_parallel

    out = {}
    for layout_name, layout in layouts.items():
        initialize_model_parallel(layout)
        for name, path in paths.items():
            arch = load_arch(path)
            if layout.expert > 1 and not arch.moe:
                continue
            chunks = build_model(arch, layout, init_weights=False)
            named = [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]
            out[name, layout_name] = (sum(p.numel() for _, p in named),
                                      sum(p.numel() for n, p in named if ".experts.local_experts." in n))
    return out


@pytest.fixture(scope="module")
def built(tiny_models, tiny_moe_models):
    paths = {"qwen2": tiny_models["qwen2"], "qwen3": tiny_models["qwen3"], **tiny_moe_models}
    held = {}
    for world in (1, 2):
        layouts = {name: layout for name, (layout, size) in LAYOUTS.items() if size == world}
        for per_rank in run_distributed(_built, world, paths, layouts):
            for key, (params, routed) in per_rank.items():
                most = held.get(key, (0, 0))
                held[key] = (max(most[0], params), max(most[1], routed))
    return paths, held


def test_the_count_on_paper_is_what_megatron_builds(built):
    paths, held = built
    moe = len(MOE_FAMILIES)
    assert len(held) == (2 + moe) * 4 + moe * 2  # every model in every layout it runs
    for (name, layout_name), (params, routed) in held.items():
        arch, layout = load_arch(paths[name]), LAYOUTS[layout_name][0]
        assert rank_parameters(arch, layout) == params, (name, layout_name)
        assert rank_routed_parameters(arch, layout) == routed, (name, layout_name)
    assert all(held[family, "ep2"][1] * 2 == held[family, "one"][1] > 0 for family in MOE_FAMILIES)


def test_the_engines_copy_is_the_hf_checkpoint(built):
    from safetensors import safe_open

    paths, _ = built
    for path in paths.values():
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            assert whole_parameters(load_arch(path)) == sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
