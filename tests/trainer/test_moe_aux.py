"""A mixture-of-experts student's router losses (`actor.moe_aux_loss_coef`, `actor.moe_aux_loss_type`,
`actor.moe_z_loss_coef`) and the step's MoE metrics: the load-balancing loss reaches the router's gradient in
proportion to its coefficient and nothing downstream of the last router; `moe/aux_loss` is megatron's switch
loss recomputed from the routing the trainer recorded, per micro-batch or per sequence, `moe/z_loss` the
recorded logits' squared log-sum-exp, and `moe/expert_load_max_over_mean` the recorded load's. One update of a tiny Qwen3-MoE student (layer 0 dense,
layers 1-3 with 4 experts, top-2) on one process, its optimizer step replaced by a capture."""
import math

import pytest
import torch

from megatron_opd.config import ConfigError
from megatron_opd.models import load_arch
from tests.conftest import run_distributed
from tests.runs import run_config

RUN = ("trainer.total_steps=1", "trainer.export_hf=false", "actor.micro_batch_size=4")  # two prompts a micro-batch
LAST = "decoder.layers.3."  # the last MoE layer


def _one_update(rank, world_size, cfg):
    """The step's metrics, one update's gradient by parameter name, the routing records, the router's coefficient."""
    from megatron_opd.trainer import loop, moe_metrics
    from megatron_opd.trainer.optim import StepOutcome
    from megatron_opd.trainer.rollouts import step_samples

    trainer = loop.Trainer(cfg)
    run = trainer.run
    grads = {}

    def capture(optimizer, clip_grad):  # one process: DDP's gradient buffers hold the whole gradient
        grads.update({name: p.main_grad.detach().clone() for name, p in run.student[0].named_parameters()})
        return StepOutcome(applied=False, grad_norm=math.nan)

    loop.optimizer_step = capture  # this forked worker's module only
    samples = step_samples(run, cfg, 0, run.next_items())
    metrics, _ = trainer.update(samples.pairs, samples.batch(run.pad_id, run.dims.device, 1))
    records = list(moe_metrics.watch(run.student).records)
    coefficient = run.student[0].config.moe_aux_loss_coeff
    run.close()
    return metrics, grads, records, coefficient


def _update(setup, tmp_path, *extra):
    return run_distributed(_one_update, 1, run_config(setup, tmp_path, *RUN, *extra), timeout_s=300)[0]


SEQUENCE_LEVEL = ("actor.moe_aux_loss_type=seq_aux_loss",)
Z_ONLY = ("actor.moe_aux_loss_coef=0", "actor.moe_z_loss_coef=0.001")


@pytest.fixture(scope="module")
def updates(distill_setup, tiny_moe_models, tmp_path_factory):
    """coefficient (or a tuple of overrides) -> one update's results: the default coefficient (config.json's), 0,
    twice the default, the sequence-level loss, the z-loss alone."""
    setup = dict(distill_setup, student=tiny_moe_models["qwen3_moe"])
    default = load_arch(setup["student"]).moe.router_aux_loss_coef
    runs = {None: (), 0: ("actor.moe_aux_loss_coef=0",), 2 * default: (f"actor.moe_aux_loss_coef={2 * default}",),
            SEQUENCE_LEVEL: SEQUENCE_LEVEL, Z_ONLY: Z_ONLY}
    return {key: _update(setup, tmp_path_factory.mktemp("aux"), *extra) for key, extra in runs.items()}


def test_the_aux_loss_changes_the_routers_gradient_in_proportion(updates, tiny_moe_models):
    default = load_arch(tiny_moe_models["qwen3_moe"]).moe.router_aux_loss_coef
    assert updates[None][3] == default > 0 and updates[0][3] == 0
    base, one, two = (updates[c][1] for c in (0, None, 2 * default))
    routers = [name for name in base if name.endswith("router.weight")]
    assert len(routers) == 3
    for name in routers:
        step = one[name] - base[name]
        assert step.abs().max() > 1e-6 * base[name].abs().max(), name
        # grad = main + c * aux: the aux part doubles with the coefficient.
        err = float((two[name] - base[name] - 2 * step).abs().max())
        assert err <= 1e-4 * float(step.abs().max()), (name, err)
    # Downstream of the last router (its experts, the final norm, the output layer) the aux loss never reaches.
    downstream = [n for n in base if n.startswith((LAST + "mlp.experts", "decoder.final_layernorm", "output_layer"))]
    assert len(downstream) >= 4
    for name in downstream:
        assert (one[name] == base[name]).all(), name
    upstream = [n for n in base if n not in downstream]
    assert any(not (one[name] == base[name]).all() for name in upstream if "router" not in name)


def _per_layer_mean(records, loss) -> float:
    """megatron's tracked value: each layer's loss averaged over its micro-batches, then over the layers."""
    per_layer = {}
    for r in records:
        per_layer.setdefault(r.layer, []).append(loss(r))
    assert sorted(per_layer) == [2, 3, 4] and all(len(v) == len(per_layer[2]) for v in per_layer.values())
    return sum(sum(v) / len(v) for v in per_layer.values()) / len(per_layer)


def _switch_loss(moe, tokens_per_expert, scores_per_expert, tokens) -> float:
    """E * sum_e f_e P_e, f_e = n_e / (T k), P_e = scores_e / T."""
    f = tokens_per_expert / (tokens * moe.top_k)
    return moe.num_experts * float((f * scores_per_expert / tokens).sum())


def test_logged_aux_loss_is_megatrons_formula_on_the_recorded_routing(updates, tiny_moe_models):
    moe = load_arch(tiny_moe_models["qwen3_moe"]).moe
    metrics, _, records, _ = updates[None]
    expected = _per_layer_mean(records, lambda r: _switch_loss(
        moe, r.tokens_per_expert.sum(dim=0), r.scores_per_expert.sum(dim=0), r.tokens))
    assert metrics["moe/aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert "moe/aux_loss" not in updates[0][0]  # no load-balancing loss, none logged


def test_the_sequence_level_loss_is_each_sequences_switch_loss(updates, tiny_moe_models):
    moe = load_arch(tiny_moe_models["qwen3_moe"]).moe
    metrics, grads, records, _ = updates[SEQUENCE_LEVEL]
    assert all(r.tokens_per_expert.shape[0] >= 2 for r in records)  # else it is the micro-batch's loss
    # megatron's sequences share one length: the micro-batch's tokens (padding left out) over its sequences.
    expected = _per_layer_mean(records, lambda r: sum(
        _switch_loss(moe, n, p, r.tokens / len(r.tokens_per_sequence))
        for n, p in zip(r.tokens_per_expert, r.scores_per_expert)) / len(r.tokens_per_sequence))
    assert metrics["moe/aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(updates[None][0]["moe/aux_loss"], rel=1e-5)  # the two losses differ here
    router = "decoder.layers.1.mlp.router.weight"
    assert not torch.allclose(grads[router], updates[None][1][router], rtol=1e-4, atol=0)


def test_the_z_loss_is_logged_and_reaches_the_router(updates):
    metrics, grads, records, _ = updates[Z_ONLY]
    expected = _per_layer_mean(records, lambda r: float(r.logsumexp_sq) / r.tokens)
    assert metrics["moe/z_loss"] == pytest.approx(expected, rel=1e-5) and "moe/aux_loss" not in metrics
    assert "moe/z_loss" not in updates[0][0]
    routers = [name for name in grads if name.endswith("router.weight")]
    assert all(not torch.equal(grads[name], updates[0][1][name]) for name in routers)


def test_padding_is_left_out_of_the_routing(updates):
    for _, _, records, _ in updates.values():
        assert any(len(set(r.tokens_per_sequence.tolist())) > 1 for r in records)  # sequences of other lengths
        for r in records:
            assert torch.equal(r.tokens_per_expert.sum(dim=1), 2 * r.tokens_per_sequence)


def test_expert_load_max_over_mean_is_the_recorded_loads(updates):
    for metrics, _, records, _ in updates.values():
        loads = {}
        for r in records:
            loads[r.layer] = loads.get(r.layer, 0) + r.tokens_per_expert.sum(dim=0)
        assert all(float(load.sum()) == sum(r.tokens for r in records if r.layer == layer) * 2
                   for layer, load in loads.items())  # top-2, dropless: every token reaches two experts
        expected = max(float(load.max() / load.mean()) for load in loads.values())
        assert metrics["moe/expert_load_max_over_mean"] == pytest.approx(expected, rel=1e-12)
        assert metrics["moe/expert_load_max_over_mean"] >= 1


@pytest.mark.parametrize("override, says", [
    ("actor.moe_aux_loss_coef=-0.1", r"actor.moe_aux_loss_coef=-0.1: must be null"),
    ("actor.moe_aux_loss_type=global_aux_loss", r"actor.moe_aux_loss_type='global_aux_loss': must be one of"),
    ("actor.moe_z_loss_coef=-1", r"actor.moe_z_loss_coef=-1"),
])
def test_bad_router_loss_keys_are_refused(distill_setup, tmp_path, override, says):
    with pytest.raises(ConfigError, match=says):
        run_config(distill_setup, tmp_path, override)
