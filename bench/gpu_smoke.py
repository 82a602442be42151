"""GPU smoke test: 5 on-policy distillation steps of a Qwen2.5-0.5B-shaped student against a Qwen2.5-1.5B-shaped
teacher (random bf16 weights, built here) at TP=1, embedded engine, full-vocabulary reverse KL; then one step
with teacher = student, which must give KL 0 and no gradient; then 3 steps of a mixture-of-experts student (a small
Qwen3-MoE shape: 32 experts, top-4, EP=1 on the one GPU, megatron's SequentialMLP experts) against the same
teacher, with its routing metrics. Prints each step's time breakdown, tokens/s and
peak GPU memory; --out writes the same as JSON. Exit 1 if the KL-0 check fails, 2 if the GPU is unusable.

A step is 16 prompts x 4 samples x 256 new tokens: 64 sequences of ~310 tokens (56-token prompts), micro-batches
of 8. Enough sequences that tokens/s says something about the update, while generation (HF decoding, one token
of the 24-layer student at a time, estimated 20-40 ms each) stays near 10 s a step, and the engine's
full-vocabulary log-probs of a step (64 x 256 x 151936 in fp32, ~25 GiB transient) leave room on an 80 GiB GPU.
Estimated, not measured: 4-5 minutes of the 8 for imports, checkpoints built on the GPU, two trainer start-ups,
6 steps and two ~7 GB trainer checkpoints (written at every run's end).

--device cpu --tiny runs the same path on tiny shapes (2 steps) on a CPU; tests/bench/test_gpu_smoke.py does.

Run: bash bench/gpu_smoke.sh --out smoke.json          (a bare GPU image; wheels: bench/prepare_gpu_wheels.sh)
     .venv/bin/python bench/gpu_smoke.py --device cpu --tiny --out /tmp/smoke.json
"""
import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from megatron_opd.parallel.quiet import quiet_known_messages

quiet_known_messages()  # before megatron is imported

import megatron.core  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from megatron_opd.demo.arithmetic import write_synthetic_parquet  # noqa: E402
from megatron_opd.demo.tiny import TINY_SIZES, tiny_hf_config, train_tokenizer  # noqa: E402
from megatron_opd.parallel.device import cuda_problem  # noqa: E402
from megatron_opd.train import CONFIG_DIR, run  # noqa: E402
from megatron_opd.trainer import loop  # noqa: E402
from megatron_opd.config import to_config  # noqa: E402

QWEN25 = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
              max_position_embeddings=32768)
# The tiny config's vocabulary exceeds the tokenizer's (300), as Qwen's 151936 does, so that path runs too.
TINY = dict(TINY_SIZES, vocab_size=512, tie_word_embeddings=True)
# Identical weights, inputs and kernels should give identical logits: KL and gradient exactly 0 (as on the CPU).
# The bounds leave room for bf16 rounding (~1e-2 relative on a logit) should a GPU kernel differ between the
# teacher's forward-only pass and the student's training pass; a real mismatch (shifted labels, a temperature
# on one side) gives KL ~1e-2 and up and a gradient ratio near 1.
KL_ZERO_ABS = 1e-4
GRAD_ZERO_REL = 2e-2
TIMINGS = tuple(f"timing_s/{name}" for name in loop.TIMINGS)
STEP_KEYS = ("actor/kl_loss", "actor/grad_norm", "response_length/mean", *TIMINGS, "perf/tokens_per_s")


@dataclass
class Plan:
    student: dict  # HF config fields
    teacher: dict
    moe_student: dict  # a Qwen3-MoE student's
    steps: int
    prompts: int
    samples: int  # rollout.n
    response_length: int
    micro_batch: int


PLANS = {
    "qwen2.5": Plan(student=dict(QWEN25, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                 intermediate_size=4864),
                    teacher=dict(QWEN25, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                 intermediate_size=8960),
                    moe_student=dict(QWEN25, tie_word_embeddings=False, hidden_size=1024, num_hidden_layers=12,
                                     num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32,
                                     num_experts_per_tok=4, moe_intermediate_size=512, mlp_only_layers=[]),
                    steps=5, prompts=16, samples=4, response_length=256, micro_batch=8),
    "tiny": Plan(student=TINY, teacher=dict(TINY, hidden_size=96, intermediate_size=192, num_hidden_layers=6),
                 moe_student=dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                 steps=2, prompts=4, samples=2, response_length=16, micro_batch=4),
}
MOE_STEPS = 3
MOE_KEYS = ("moe/aux_loss", "moe/expert_load_max_over_mean")
MAX_PROMPT_LENGTH = 128  # the synthetic prompts are 53-57 tokens with the local tokenizer's chat template


def versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "megatron-core": megatron.core.__version__}


def write_checkpoint(out_dir: str, fields: dict, seed: int, tokenizer, device: str, family: str = "qwen2") -> int:
    """A random bf16 HF checkpoint of `family`, initialised on `device` (a GPU does 2B parameters in seconds); its
    parameter count. Not tiny.write_tiny_checkpoint: that one ties the vocabulary to the tokenizer's."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=None, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def overrides(plan: Plan, student: str, teacher: str, train: str, steps: int, save_dir: str, device: str) -> list:
    return [f"student.path={student}", f"teacher.path={teacher}", f"data.train_files={train}",
            f"data.train_batch_size={plan.prompts}", f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
            "rollout.engine=local", f"rollout.n={plan.samples}", f"rollout.response_length={plan.response_length}",
            "actor.kl_loss_type=reverse", f"actor.micro_batch_size={plan.micro_batch}", "parallel.tensor=1",
            f"trainer.total_steps={steps}", f"trainer.save_dir={save_dir}", "trainer.logger=[console,jsonl]",
            f"trainer.device={device}", "trainer.resume=never", "trainer.export_hf=false"]


def train(args: list, device: str) -> dict:
    """One in-process run through the trainer's own entry point: its steps, wall time and peak GPU memory."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = to_config(compose(config_name="distillation_trainer", overrides=args))
    cuda = device == "cuda"
    if cuda:  # the peak is this run's alone
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None  # what an earlier run left behind
    started = time.perf_counter()
    history = run(cfg)
    wall_s = time.perf_counter() - started
    sequences = cfg.data.train_batch_size * cfg.rollout.n
    steps = []
    for record in history:
        step = {"step": record["step"], **{key: record[key] for key in (*STEP_KEYS, *MOE_KEYS) if key in record}}
        step["perf/generated_tokens_per_s"] = step["response_length/mean"] * sequences / step["timing_s/gen"]
        steps.append(step)
    shutil.rmtree(cfg.trainer.save_dir, ignore_errors=True)  # at full size the checkpoint is ~7 GB
    return {"wall_s": wall_s, "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "start_gpu_mem_gib": held_gib, "steps": steps}


def steady(steps: list) -> dict:
    """Means over the steps after the first, which pays the warm-up."""
    later = steps[1:] or steps
    return {key: sum(s[key] for s in later) / len(later)
            for key in (*TIMINGS, "perf/tokens_per_s", "perf/generated_tokens_per_s")}


def print_run(name: str, result: dict) -> None:
    peak = result["peak_gpu_mem_gib"]
    memory = (f"{peak:.2f} GiB ({result['start_gpu_mem_gib']:.2f} GiB held at its start)" if peak is not None
              else "n/a (CPU)")
    print(f"\n{name}: {result['wall_s']:.1f} s wall (start-up, steps, checkpoint), peak GPU memory {memory}")
    heads = ("step", "kl", "grad_norm", "gen_s", "teacher_s", "update_s", "sync_s", "step_s", "tok/s", "gen_tok/s")
    print(" ".join(f"{h:>10}" for h in heads))
    for s in result["steps"]:
        values = (s["actor/kl_loss"], s["actor/grad_norm"], *(s[k] for k in TIMINGS), s["perf/tokens_per_s"],
                  s["perf/generated_tokens_per_s"])
        print(f"{s['step']:>10} " + " ".join(f"{v:>10.4g}" for v in values))


def smoke(plan: Plan, device: str, workdir: str, report: dict, dump) -> bool:
    """Build, run both, fill `report` (dumped after each phase, so a later failure keeps the figures)."""
    began = time.perf_counter()
    tokenizer = train_tokenizer()
    student, teacher = os.path.join(workdir, "student"), os.path.join(workdir, "teacher")
    report["params"] = {"student": write_checkpoint(student, plan.student, 1, tokenizer, device),
                        "teacher": write_checkpoint(teacher, plan.teacher, 2, tokenizer, device)}
    train_file = write_synthetic_parquet(os.path.join(workdir, "train.parquet"), 256, seed=0)
    report["build_s"] = time.perf_counter() - began
    print(f"checkpoints: student {report['params']['student'] / 1e6:.1f}M, teacher "
          f"{report['params']['teacher'] / 1e6:.1f}M parameters, built in {report['build_s']:.1f} s")

    opd = train(overrides(plan, student, teacher, train_file, plan.steps, os.path.join(workdir, "opd"), device),
                device)
    report["opd"] = {**opd, "steady": steady(opd["steps"])}
    print_run(f"OPD, {plan.steps} steps", opd)
    dump()

    # Same seeds, same student: its one step draws the prompts and sampling seed of the OPD run's first step.
    same = train(overrides(plan, student, student, train_file, 1, os.path.join(workdir, "kl_zero"), device), device)
    kl, grad = same["steps"][0]["actor/kl_loss"], same["steps"][0]["actor/grad_norm"]
    reference = opd["steps"][0]["actor/grad_norm"]
    passed = abs(kl) <= KL_ZERO_ABS and grad <= GRAD_ZERO_REL * reference
    report["kl_zero"] = {**same, "kl_loss": kl, "grad_norm": grad, "reference_grad_norm": reference,
                         "kl_abs_tolerance": KL_ZERO_ABS, "grad_rel_tolerance": GRAD_ZERO_REL, "passed": passed}
    print_run("teacher = student, 1 step", same)
    print(f"\nKL-0 check {'passed' if passed else 'FAILED'}: KL {kl:.3g} (bound {KL_ZERO_ABS:g}), grad norm {grad:.3g} "
          f"against {reference:.3g} with the real teacher on the same batch (bound {GRAD_ZERO_REL:g}x)")
    dump()

    moe_student = os.path.join(workdir, "moe_student")
    report["params"]["moe_student"] = write_checkpoint(moe_student, plan.moe_student, 3, tokenizer, device,
                                                       family="qwen3_moe")
    moe = train(overrides(plan, moe_student, teacher, train_file, MOE_STEPS, os.path.join(workdir, "moe"), device),
                device)
    report["moe"] = {**moe, "steady": steady(moe["steps"])}
    print_run(f"mixture-of-experts student ({report['params']['moe_student'] / 1e6:.1f}M parameters), "
              f"{MOE_STEPS} steps", moe)
    print("routing: " + ", ".join(f"step {s['step']} {k} {s[k]:.3g}" for s in moe["steps"] for k in MOE_KEYS))
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and 2 steps (the CPU check)")
    parser.add_argument("--out", help="also write the figures here as JSON")
    parser.add_argument("--workdir", help="for checkpoints and data (default: a temporary folder, removed after)")
    args = parser.parse_args()
    if args.device == "cuda" and cuda_problem():
        print(f"gpu_smoke: the GPU is not usable: {cuda_problem()}. This script measures a GPU; `--device cpu --tiny` "
              f"runs its CPU check.", file=sys.stderr)
        return 2
    began = time.perf_counter()
    plan = PLANS["tiny" if args.tiny else "qwen2.5"]
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "versions": versions(),
              "plan": asdict(plan)}

    def dump():
        report["total_s"] = time.perf_counter() - began
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    workdir = args.workdir or tempfile.mkdtemp(prefix="opd_gpu_smoke_")
    try:
        passed = smoke(plan, args.device, workdir, report, dump)
    finally:
        dump()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    s = report["opd"]["steady"]
    print(f"steady state (steps 2-{plan.steps}): {s['timing_s/step']:.2f} s/step (gen {s['timing_s/gen']:.2f}, "
          f"teacher {s['timing_s/teacher']:.2f}, update {s['timing_s/update_actor']:.2f}, sync "
          f"{s['timing_s/sync']:.2f}), {s['perf/tokens_per_s']:.0f} tokens/s, "
          f"{s['perf/generated_tokens_per_s']:.0f} generated tokens/s; total {report['total_s']:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
