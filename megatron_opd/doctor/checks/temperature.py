"""Check 2 (on paper): the temperature each side's log-probs enter the divergence at, the one the student
samples at, and a served teacher's (SGLang scores given tokens at 1). The measured half is the self-test
(a teacher whose log-probs enter at another temperature than the student's) and the engine check."""
from megatron_opd.config import OPDConfig, divergence_temperature, run_teachers, teacher_key
from megatron_opd.doctor.report import FAIL, OK, Finding
from megatron_opd.trainer.objective import Objective

CHECK = "temperature"
SERVED_TEMPERATURE = 1.0  # SGLang 0.5.23's input log-probs are a log_softmax of the raw logits


def check_temperature(cfg: OPDConfig) -> list:
    temperature = divergence_temperature(cfg)
    source = "actor.kl_temperature" if cfg.actor.kl_temperature else "rollout.temperature (actor.kl_temperature=null)"
    student = Objective.of_run(cfg, 1, None, None).temperature  # the trainer's own resolution
    if student != temperature:
        return [Finding(CHECK, FAIL, f"the trainer's objective takes the student's log-probs at T={student:g}, "
                                     f"the config resolves T={temperature:g} ({source}): both sides must enter at "
                                     f"one temperature (megatron_opd/trainer/objective.py)")]
    lines = [f"both sides enter the divergence at T={temperature:g} ({source}); the student samples at "
             f"rollout.temperature={cfg.rollout.temperature:g}"]
    if cfg.trainer.mode == "distill":
        for name, teacher in run_teachers(cfg).items():
            key = teacher_key(cfg, name)
            if teacher.engine == "sglang":
                if temperature != SERVED_TEMPERATURE:  # the config refuses it; a hand-built config may not
                    return [Finding(CHECK, FAIL, f"{key}.engine=sglang scores at T=1 but the student's log-probs "
                                                 f"enter at T={temperature:g}: set actor.kl_temperature=1.0")]
                lines.append(f"{key} is served (engine=sglang) and scores at T=1 = actor.kl_temperature")
            else:
                lines.append(f"{key} (engine=megatron) scores at T={temperature:g}")
    if cfg.actor.policy_loss == "pg":
        lines.append("actor.policy_loss=pg: advantages and ratios are taken at the sampling temperature")
    return [Finding(CHECK, OK, "; ".join(lines), details={
        "divergence": temperature, "sampling": cfg.rollout.temperature, "student": student})]
