"""Check 5: engine against trainer. The embedded engine's log-probs of its own samples (kept with each
sample, as the run keeps them) against the trainer's log-probs of the same tokens at rollout.temperature:
the mismatch the policy-gradient form's importance weights see. An engine whose log-probs fit another
temperature samples at it, not at the one the trainer assumes."""
import math

from megatron_opd.doctor.measure import fit_temperature, gaps
from megatron_opd.doctor.report import FAIL, OK, WARN, Finding

CHECK = "engine"
# The embedded engine runs transformers' arithmetic, the trainer megatron's: float32 log-probs agree to ~1e-5
# (README: ratio 1 +- 1e-4 on CPU); bf16 to a few 1e-2.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
MAX_RATIO = 2.0  # beyond it, importance weights at a typical actor.is_cap would truncate or drop the token


def check_engine(session) -> list:
    cfg, tolerance = session.cfg, TOLERANCE[session.dtype]
    temperature = cfg.rollout.temperature
    engine = [mb.engine_logprobs for mb in session.micro]
    trainer = session.student_log_probs(temperature)
    gap, mean = gaps(engine, trainer, session.masks)
    ratio = math.exp(gap)
    details = {"max_gap": gap, "mean_gap": mean, "max_ratio": ratio, "tolerance": tolerance,
               "tokens": session.response_tokens, "engine": "embedded"}
    measured = (f"embedded engine vs trainer on {session.response_tokens} sampled tokens at rollout.temperature="
                f"{temperature:g}: max |Δ log-prob| {gap:.3g}, mean {mean:.3g}, max ratio {ratio:.4g} (tolerance "
                f"{tolerance:g}, {session.dtype})")
    on_sglang = cfg.rollout.engine == "sglang"
    if on_sglang:
        measured += ("; rollout.engine=sglang: this check ran on the embedded engine, not on SGLang (a server costs "
                     "a GPU and minutes to start); the run's mismatch/* metrics measure SGLang's every step")
    if gap <= tolerance:
        return [Finding(CHECK, WARN if on_sglang else OK, measured, details=details)]
    fitted, fitted_gap = fit_temperature(engine, session.student_log_probs, session.masks)
    details.update(fitted_temperature=fitted, fitted_max_gap=fitted_gap)
    if fitted_gap <= tolerance and abs(fitted - temperature) > 1e-3 * temperature:
        return [Finding(CHECK, FAIL, f"{measured}. The engine samples at another temperature than the trainer "
                                     f"assumes: its log-probs equal the trainer's at T={fitted:.3g}, not at "
                                     f"rollout.temperature={temperature:g}; the engine must get rollout.temperature "
                                     f"(SamplingParams, trainer/setup.py Run.sampling)", details=details)]
    status = FAIL if ratio > MAX_RATIO else WARN
    return [Finding(CHECK, status, f"{measured}. The engine and the trainer disagree on the student's weights: check "
                                   f"the weight sync and rollout.engine's dtype; under actor.policy_loss=pg the "
                                   f"importance weights (actor.is_cap) would see ratios up to {ratio:.3g}",
                    details=details)]
