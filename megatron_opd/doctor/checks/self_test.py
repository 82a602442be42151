"""Check 3: teacher = student. The student's own checkpoint as its teacher, through the trainer's teacher
path (make_teacher) and objective (Objective, LossInputs, the student's forward-backward), on the doctor's
rows: every token's divergence and the loss's gradient must vanish. A teacher whose log-probs enter at
another temperature than the student's does not vanish; the temperature its log-probs fit is then named."""
import dataclasses

import torch

from megatron_opd.doctor.measure import fit_temperature
from megatron_opd.doctor.report import FAIL, OK, Finding
from megatron_opd.loss import response_counts
from megatron_opd.loss.kinds import SAMPLED_KINDS, TOPK_KINDS
from megatron_opd.models.pipeline import student_pass
from megatron_opd.trainer.objective import LossInputs

CHECK = "self_test"
# float32: the teacher's log-probs (from its logits) and the student's (fused, chunked) agree to ~1e-7, so a
# vanishing divergence stays orders below this; bf16 rounds log-probs at ~1e-2.
TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-2}
# Estimators whose per-sample gradient is not 0 at teacher = student (only its expectation is): k1's is the
# score function, abs's the sign of rounding noise. Their value is checked, not their gradient.
NO_ZERO_GRADIENT = ("kl", "k1", "abs")


def _teacher_values(objective, outputs: list, session) -> tuple[list, list]:
    """(token ids, the teacher's log-probs of them) per row, for the sampled and top-k kinds."""
    if objective.actor.kl_loss_type in TOPK_KINDS:
        return [o["topk_ids"] for o in outputs], [o["topk_logprobs"] for o in outputs]
    return [mb.labels for mb in session.micro], [o["logprobs"] for o in outputs]


def one_sided_temperature(session, objective, teacher, outputs: list, tolerance: float):
    """The message naming a temperature applied on one side only, or None when the teacher's log-probs fit
    no other temperature than the student's."""
    kind = objective.actor.kl_loss_type
    if kind not in SAMPLED_KINDS + TOPK_KINDS:
        return None
    ids, teacher_logprobs = _teacher_values(objective, outputs, session)
    masks = [m.unsqueeze(-1).expand_as(t) if t.dim() > m.dim() else m for m, t in zip(session.masks, teacher_logprobs)]
    fitted, gap = fit_temperature(teacher_logprobs, lambda t: session.student_log_probs(t, ids), masks)
    if gap > tolerance or abs(fitted - objective.temperature) <= 1e-3 * objective.temperature:
        return None
    return (f"a temperature applied on one side only: the teacher's log-probs equal the student's at T={fitted:.3g} "
            f"(max |Δ| {gap:.2g}; the teacher object scores at T={teacher.temperature:g}), but the student's enter "
            f"the divergence at T={objective.temperature:g} (divergence_temperature: actor.kl_temperature, else "
            f"rollout.temperature); both must enter at one temperature (megatron_opd/teacher, trainer/objective.py)")


def check_self_test(session) -> list:
    tolerance = TOLERANCE[session.dtype]
    teacher = session.self_teacher()
    try:
        objective = session.objective(teacher)
        outputs = teacher.outputs(session.pairs, session.batch, session.micro)
        counts = response_counts(session.masks)
        peaks = []

        def share(index, hidden, mb):
            inputs = LossInputs(hidden, session.weight, mb, counts, index, outputs[index])
            with torch.no_grad():
                kl = objective.per_token_kl(dataclasses.replace(inputs, hidden=hidden.detach()))
            peaks.append(torch.where(mb.loss_mask.bool(), kl.abs(), 0.0).max())
            return objective(inputs)

        session.zero_grad()
        student_pass(session.student, session.micro, share, scale=len(session.micro), cp_size=1)
        value, grad_norm = torch.stack(peaks).max().item(), session.grad_norm()
        session.zero_grad()
        kind = objective.actor.kl_loss_type
        checks_gradient = kind.rstrip("+") not in NO_ZERO_GRADIENT or kind.endswith("+")
        details = {"max_token_divergence": value, "grad_norm": grad_norm, "tolerance": tolerance,
                   "kind": kind, "temperature": objective.temperature, "tokens": session.response_tokens,
                   "gradient_checked": checks_gradient}
        measured = (f"actor.kl_loss_type={kind} at T={objective.temperature:g} with student.path as its own teacher "
                    f"on {session.response_tokens} sampled tokens: max |divergence| {value:.2g}, gradient norm "
                    f"{grad_norm:.2g} (tolerance {tolerance:g}, {session.dtype})")
        if value <= tolerance and (grad_norm <= tolerance or not checks_gradient):
            note = "" if checks_gradient else f"; {kind}'s per-sample gradient is not 0 here (only its expectation)"
            return [Finding(CHECK, OK, measured + note, details=details)]
        cause = one_sided_temperature(session, objective, teacher, outputs, tolerance)
        return [Finding(CHECK, FAIL, f"{measured}. The divergence does not vanish at teacher = student: "
                                     f"{cause or 'the teacher path and the student disagree on the same weights'}",
                        details={**details, "one_sided_temperature": cause is not None})]
    finally:
        teacher.close()
