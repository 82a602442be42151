"""A mixture-of-experts student's router load-balancing loss (`actor.moe_aux_loss_coef`) and the step's MoE
metrics: the loss reaches the router's gradient in proportion to its coefficient and nothing downstream of the
last router; `moe/aux_loss` is megatron's switch loss recomputed from the routing the trainer recorded, and
`moe/expert_load_max_over_mean` the recorded load's. One update of a tiny Qwen3-MoE student (layer 0 dense,
layers 1-3 with 4 experts, top-2) on one process, its optimizer step replaced by a capture."""
import math

import pytest

from megatron_opd.config import ConfigError
from megatron_opd.models import load_arch
from tests.conftest import run_distributed
from tests.runs import run_config

RUN = ("trainer.total_steps=1", "trainer.export_hf=false")
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


@pytest.fixture(scope="module")
def updates(distill_setup, tiny_moe_models, tmp_path_factory):
    """coefficient -> one update's results: the default (config.json's), 0 and twice the default."""
    setup = dict(distill_setup, student=tiny_moe_models["qwen3_moe"])
    default = load_arch(setup["student"]).moe.router_aux_loss_coef
    return {c: _update(setup, tmp_path_factory.mktemp("aux"), *([] if c is None else [f"actor.moe_aux_loss_coef={c}"]))
            for c in (None, 0, 2 * default)}


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


def test_logged_aux_loss_is_megatrons_formula_on_the_recorded_routing(updates, tiny_moe_models):
    moe = load_arch(tiny_moe_models["qwen3_moe"]).moe
    metrics, _, records, _ = updates[None]
    per_layer = {}
    for r in records:  # switch loss per micro-batch: E * sum_e f_e P_e, f_e = n_e / (T k), P_e = scores_e / T
        f = r.tokens_per_expert / (r.tokens * moe.top_k)
        per_layer.setdefault(r.layer, []).append(moe.num_experts * float((f * r.scores_per_expert / r.tokens).sum()))
    assert sorted(per_layer) == [2, 3, 4] and all(len(v) == len(per_layer[2]) for v in per_layer.values())
    expected = sum(sum(v) / len(v) for v in per_layer.values()) / len(per_layer)
    assert metrics["moe/aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert "moe/aux_loss" not in updates[0][0]  # no load-balancing loss, none logged


def test_expert_load_max_over_mean_is_the_recorded_loads(updates):
    for metrics, _, records, _ in updates.values():
        loads = {}
        for r in records:
            loads[r.layer] = loads.get(r.layer, 0) + r.tokens_per_expert
        assert all(float(load.sum()) == sum(r.tokens for r in records if r.layer == layer) * 2
                   for layer, load in loads.items())  # top-2, dropless: every token reaches two experts
        expected = max(float(load.max() / load.mean()) for load in loads.values())
        assert metrics["moe/expert_load_max_over_mean"] == pytest.approx(expected, rel=1e-12)
        assert metrics["moe/expert_load_max_over_mean"] >= 1


def test_a_negative_coefficient_is_refused(distill_setup, tmp_path):
    with pytest.raises(ConfigError, match=r"actor.moe_aux_loss_coef=-0.1: must be null"):
        run_config(distill_setup, tmp_path, "actor.moe_aux_loss_coef=-0.1")
