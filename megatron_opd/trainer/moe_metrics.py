"""A mixture-of-experts student's routing over a step's training passes, and its global metrics.

A forward hook on each of the student's routers records, per micro-batch, MoE layer and sequence, the tokens
each expert received (the dispatched routing map) and the router's summed scores per expert (megatron's scores
for the load-balancing loss: the softmax over all experts), and the summed squared log-sum-exp of its logits
(the z-loss's), padding left out; passes without gradients (pi_old's, rollouts, the teacher's) are not training
passes and are skipped, and under full recompute only the pass that keeps gradients counts. The losses themselves are the ones megatron computed and tracked (`get_moe_metrics_tracker`).
"""
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

# megatron's tracker name -> the metric; the aux and z losses are tracked without their coefficients.
TRACKED = {"aux_loss": ("load_balancing_loss", "moe/aux_loss"),
           "seq_aux_loss": ("seq_load_balancing_loss", "moe/aux_loss")}
Z_LOSS = ("z_loss", "moe/z_loss")


@dataclass
class Routed:
    """One router's forward on one micro-batch (this rank's tokens, B sequences), padding left out."""
    layer: int  # megatron's global 1-based layer number
    tokens_per_expert: torch.Tensor  # [B, E]: each sequence's tokens dispatched to each expert
    scores_per_expert: torch.Tensor  # [B, E]: the router's scores summed over each sequence's tokens
    tokens_per_sequence: torch.Tensor  # [B]
    logsumexp_sq: torch.Tensor  # the squared log-sum-exp of the router's logits, summed over the tokens

    @property
    def tokens(self) -> int:
        return int(self.tokens_per_sequence.sum())


def _per_sequence(per_token: torch.Tensor, seq_length: int, sequences: int) -> torch.Tensor:
    """[S*B, E] -> [B, E], summed over each sequence's tokens."""
    return per_token.view(seq_length, sequences, -1).sum(dim=0).double()


def _tracked(config) -> list:
    names = []
    if config.moe_aux_loss_coeff > 0 and config.moe_router_load_balancing_type in TRACKED:
        names.append(TRACKED[config.moe_router_load_balancing_type])
    if config.moe_z_loss_coeff is not None:
        names.append(Z_LOSS)
    return names


class StudentRouting:
    """The student's routers watched for a step: `start()`, the step's passes, then `metrics(dims)`."""

    def __init__(self, chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.config = chunks[0].config
        self.records: list[Routed] = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._record)

    @property
    def is_moe(self) -> bool:
        return self.config.num_moe_experts is not None

    def _record(self, router, args, output):
        from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = output
        seq_length, sequences = args[0].shape[:2]  # [S, B, H]: megatron's token order is S-major
        padding = args[1] if len(args) > 1 and args[1] is not None else None  # [S, B], True: padded
        with torch.no_grad():  # the gate again: the router keeps neither its logits nor the full scores
            logits = router.gating(args[0]).view(-1, router.num_experts)
            _, scores = compute_routing_scores_for_aux_loss(logits, router.topk, router.score_function)
            valid = (torch.ones(seq_length, sequences, dtype=torch.bool, device=logits.device) if padding is None
                     else ~padding.bool()).reshape(-1, 1)
            z = (torch.logsumexp(logits.double(), dim=-1).square() * valid[:, 0]).sum()
            per_sequence = [_per_sequence(t * valid, seq_length, sequences) for t in (routing_map, scores, valid)]
            self.records.append(Routed(router.layer_number, *per_sequence[:2], per_sequence[2][:, 0], z))

    def start(self) -> None:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        self.records.clear()
        get_moe_metrics_tracker().clear()

    def metrics(self, dims) -> dict:
        """Collective (every rank). `moe/expert_load_max_over_mean`: per MoE layer, the tokens of its busiest
        expert over the mean tokens per expert, both summed over the step's training micro-batches and every
        rank; the largest over the layers. `moe/aux_loss` (and `moe/z_loss`): megatron's per-layer losses
        without their coefficients, each a mean over a rank's micro-batches, summed over the TP x CP parts,
        averaged over the DP ranks, then averaged over the MoE layers: what megatron's tracker reports."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        if not self.is_moe:
            return {}
        layers, experts = self.config.num_layers, self.config.num_moe_experts
        load = torch.zeros(layers, experts, dtype=torch.float64, device=dims.device)
        passes = torch.zeros(layers, dtype=torch.float64, device=dims.device)
        for record in self.records:
            load[record.layer - 1] += record.tokens_per_expert.sum(dim=0).to(dims.device)
            passes[record.layer - 1] += 1
        tracker = get_moe_metrics_tracker().metrics
        tracked = _tracked(self.config)
        losses = torch.zeros(len(tracked), layers, dtype=torch.float64, device=dims.device)
        for row, (name, _) in enumerate(tracked):
            if name in tracker:  # a pipeline stage without MoE layers tracks nothing
                losses[row] = tracker[name].values[:layers].double().to(dims.device) / passes.clamp(min=1)
        losses /= dims.dp_size
        vector = torch.cat([load.flatten(), losses.flatten()])
        dist.all_reduce(vector)  # layers are disjoint over stages, tokens over the TP (SP) x CP x DP ranks
        load, losses = vector[:load.numel()].view(layers, experts), vector[load.numel():].view(len(tracked), layers)
        routed = load.sum(dim=1) > 0  # the MoE layers
        ratio = load[routed].max(dim=1).values / load[routed].mean(dim=1)
        out = {"moe/expert_load_max_over_mean": ratio.max().item()}
        for row, (_, metric) in enumerate(tracked):
            out[metric] = (losses[row, routed].sum() / routed.sum()).item()
        return out


_WATCHED = weakref.WeakKeyDictionary()


def watch(chunks) -> StudentRouting:
    """The routing of a model's `chunks`, its hooks registered on first use."""
    if chunks[0] not in _WATCHED:
        _WATCHED[chunks[0]] = StudentRouting(chunks)
    return _WATCHED[chunks[0]]
