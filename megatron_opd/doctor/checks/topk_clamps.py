"""Check 6: on the student's samples, how much of the teacher's (tempered) probability mass its top-k holds
(top-k kinds), and how often verl's clamps would bind: actor.loss_max_clamp on each token's divergence,
actor.log_prob_min_clamp on the sampled and top-k kinds' log-probs (either side)."""
import torch

from megatron_opd.doctor.measure import masked_values
from megatron_opd.doctor.report import OK, WARN, Finding, worst
from megatron_opd.loss import response_counts
from megatron_opd.loss.kinds import FULL_KINDS, TOPK_KINDS
from megatron_opd.trainer.objective import LossInputs

CHECK = "topk_clamps"
MIN_COVERAGE = 0.9  # below it the tail bucket holds over a tenth of the teacher's mass: raise actor.topk
MAX_CLAMPED = 0.1  # a clamp binding on more tokens than this removes their gradient from a large share


def _coverage(key: str, topk: int, outputs: list, masks: list) -> tuple:
    mass = masked_values([o["topk_logprobs"].logsumexp(-1).exp() for o in outputs], masks)
    mean, low = mass.mean().item(), mass.min().item()
    text = f"{key}'s top-{topk} holds {mean:.3f} of its probability mass on average, {low:.3f} at least"
    if mean < MIN_COVERAGE:
        return WARN, f"{text}: below {MIN_COVERAGE}; raise actor.topk", {"coverage_mean": mean, "coverage_min": low}
    return OK, text, {"coverage_mean": mean, "coverage_min": low}


def _clamped(session, objective, outputs: list) -> tuple[list, dict]:
    """(status, text) per configured clamp, and the shares of tokens each binds on."""
    actor, found, shares = session.cfg.actor, [], {}
    if actor.loss_max_clamp is not None:
        counts = response_counts(session.masks)
        with torch.no_grad():
            kl = [objective.per_token_kl(LossInputs(h, session.weight, mb, counts, i, outputs[i]))
                  for i, (h, mb) in enumerate(zip(session.hidden, session.micro))]
        shares["loss_max_clamp"] = (masked_values(kl, session.masks).abs() > actor.loss_max_clamp).float().mean().item()
    if actor.log_prob_min_clamp is not None and actor.kl_loss_type not in FULL_KINDS:
        topk = actor.kl_loss_type in TOPK_KINDS
        ids = [o["topk_ids"] for o in outputs] if topk else [mb.labels for mb in session.micro]
        student = session.student_log_probs(objective.temperature, ids)
        teacher = [o["topk_logprobs"] if topk else o["logprobs"] for o in outputs]
        low = [torch.minimum(s, t) < actor.log_prob_min_clamp for s, t in zip(student, teacher)]
        shares["log_prob_min_clamp"] = masked_values(low, session.masks).float().mean().item()
    for name, share in shares.items():
        value = getattr(actor, name)
        text = f"actor.{name}={value:g} binds on {share:.1%} of the sampled tokens"
        found.append((WARN, f"{text}: above {MAX_CLAMPED:.0%}, those tokens train on nothing; loosen it")
                     if share > MAX_CLAMPED else (OK, text))
    return found, shares


def check_topk_clamps(session, key: str, name: str, teacher) -> Finding:
    actor = session.cfg.actor
    if actor.kl_loss_type not in TOPK_KINDS and actor.loss_max_clamp is None and actor.log_prob_min_clamp is None:
        return Finding(CHECK, OK, f"actor.kl_loss_type={actor.kl_loss_type} is no top-k kind and no clamp is set",
                       name)
    objective = session.objective(teacher, clamps=False)
    outputs = teacher.outputs(session.pairs, session.batch, session.micro)
    found, details = [], {}
    if actor.kl_loss_type in TOPK_KINDS:
        status, text, numbers = _coverage(key, actor.topk, outputs, session.masks)
        found.append((status, text))
        details.update(numbers)
    clamps, shares = _clamped(session, objective, outputs)
    found += clamps
    details.update(clamped_share=shares)
    return Finding(CHECK, worst(s for s, _ in found), "; ".join(t for _, t in found), name, details)
