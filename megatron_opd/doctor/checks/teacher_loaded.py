"""Check 4: the teacher actually loaded. Its log-probs of the doctor's rows (at T=1, over the shared
vocabulary), from the model the trainer's teacher path built, must differ from the student's — equal ones
mean the teacher's path holds the student's weights — and must match the checkpoint's own transformers
forward."""
import os

import torch

from checkpoint_tools.pretrained import is_hf_dir
from megatron_opd.doctor.measure import gaps
from megatron_opd.doctor.report import FAIL, OK, WARN, Finding
from megatron_opd.doctor.session import TORCH_DTYPES
from megatron_opd.loss import vocab_parallel_log_probs
from megatron_opd.models.pipeline import forward_pass
from megatron_opd.trainer.setup import model_dtype

CHECK = "teacher_loaded"
# Megatron's forward and transformers' differ by float reduction order: ~1e-6 in float32 on the tiny models,
# more through many layers; bf16 keeps 8 mantissa bits, ~1e-2 per log-prob.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1}


def megatron_log_probs(session, teacher) -> list:
    """The teacher's log-probs of each row's next tokens at T=1, from the chunks the teacher path loaded."""
    dims = teacher.dims

    def keep(logits, mb):
        return vocab_parallel_log_probs(logits, mb.labels, 1.0, group=dims.tp_group, vocab_size=session.vocab_size)

    return forward_pass(teacher.chunks, session.micro, keep, dims.cp_size, dims.pg_collection)


@torch.no_grad()
def hf_log_probs(session, path: str, dtype: str) -> list:
    """The same from transformers' forward of the HF checkpoint at `path`, over the shared vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).to(session.dims.device).eval()
    out = []
    for mb in session.micro:
        logits = model(mb.tokens).logits[..., :session.vocab_size].float()
        out.append(logits.log_softmax(-1).gather(-1, mb.labels.unsqueeze(-1)).squeeze(-1))
    del model
    return out


def _same_weights(key: str, path: str, student_path: str, gap: float, tolerance: float):
    """The failure of a teacher that is the student, or None."""
    same_dir = os.path.realpath(path) == os.path.realpath(student_path)
    if not same_dir and gap > tolerance:
        return None
    return (f"{key}.path holds the student's weights ({key}.path={path}"
            f"{' is student.path' if same_dir else f', a copy of student.path={student_path}'}: its log-probs equal "
            f"the student's, max |Δ| {gap:.2g}); set {key}.path to the teacher's checkpoint")


def check_teacher_loaded(session, key: str, name: str, teacher_cfg, teacher) -> Finding:
    """`teacher`: the built Megatron teacher, or None for a served one (its checkpoint is read by
    transformers instead)."""
    dtype = model_dtype(teacher_cfg, key)
    tolerance = TOLERANCE[dtype]
    hf = is_hf_dir(teacher_cfg.path)
    reference = hf_log_probs(session, teacher_cfg.path, dtype) if hf else None
    scores = megatron_log_probs(session, teacher) if teacher is not None else reference
    if scores is None:
        return Finding(CHECK, WARN, f"{key}.path={teacher_cfg.path}: a served teacher with no HF checkpoint to read",
                       name)
    student = session.student_log_probs(1.0)
    student_gap, student_mean = gaps(scores, student, session.masks)
    details = {"max_gap_to_student": student_gap, "mean_gap_to_student": student_mean, "tolerance": tolerance}
    same = _same_weights(key, teacher_cfg.path, session.cfg.student.path, student_gap, tolerance)
    if same:
        return Finding(CHECK, FAIL, same, name, details)
    differs = f"differs from the student's (max |Δ log-prob| {student_gap:.3g}, mean {student_mean:.3g})"
    if teacher is None:
        return Finding(CHECK, WARN, f"{key} is served (engine=sglang): its server was not started here, so its "
                                    f"scores are unchecked; {key}.path read by transformers {differs}", name, details)
    if not hf:
        return Finding(CHECK, WARN, f"{key}.path={teacher_cfg.path} is a converted Megatron checkpoint: there is no "
                                    f"transformers forward to compare its scores with (convert a copy with opd-convert "
                                    f"mcore-to-hf to check); it {differs}", name, details)
    hf_gap, hf_mean = gaps(scores, reference, session.masks)
    details.update(max_gap_to_transformers=hf_gap, mean_gap_to_transformers=hf_mean)
    if hf_gap > tolerance:
        return Finding(CHECK, FAIL, f"{key}.path={teacher_cfg.path}: the teacher the trainer built scores "
                                    f"differently from transformers' forward of the same checkpoint (max |Δ log-prob| "
                                    f"{hf_gap:.3g} > {tolerance:g}): its weights did not load as written; check the "
                                    f"checkpoint's config.json and weight names", name, details)
    return Finding(CHECK, OK, f"{key}: {differs}; equals transformers' forward of {key}.path to max |Δ| {hf_gap:.2g} "
                              f"(tolerance {tolerance:g}, {dtype})", name, details)
