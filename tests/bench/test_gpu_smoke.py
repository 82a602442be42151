"""bench/gpu_smoke.py through its command line: the CPU check (tiny shapes) passes the KL-0 check and writes
the figures a GPU run brings back, the mixture-of-experts student's included; asked for a GPU it cannot use, it refuses with exit 2 and says why."""
import json
import os
import subprocess
import sys

import pytest

from megatron_opd.trainer.loop import TIMINGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "gpu_smoke.py")


def smoke(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cpu_check_passes_and_reports_the_figures(tmp_path):
    out = tmp_path / "smoke.json"
    done = smoke("--device", "cpu", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "KL-0 check passed" in done.stdout
    report = json.loads(out.read_text())
    zero = report["kl_zero"]
    assert zero["passed"] and abs(zero["kl_loss"]) <= zero["kl_abs_tolerance"]
    steps = report["opd"]["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    # The real teacher differs from the student: the check compares against a KL and gradient far from 0.
    assert steps[0]["actor/kl_loss"] > 100 * zero["kl_abs_tolerance"] and zero["reference_grad_norm"] > 0
    for step in steps:
        assert all(step[f"timing_s/{name}"] > 0 for name in TIMINGS), step
        assert step["perf/tokens_per_s"] > 0 and step["perf/generated_tokens_per_s"] > 0
    assert report["opd"]["steady"]["perf/tokens_per_s"] > 0
    assert report["opd"]["peak_gpu_mem_gib"] is None and report["device"] == "cpu"
    moe = report["moe"]["steps"]  # the mixture-of-experts student's run, its routing reported
    assert [s["step"] for s in moe] == [1, 2, 3] and report["params"]["moe_student"] > 0
    assert all(s["moe/expert_load_max_over_mean"] >= 1 and s["moe/aux_loss"] > 0 and s["actor/kl_loss"] > 0
               for s in moe)


def test_refuses_when_the_gpu_is_unusable():
    done = smoke("--tiny", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the GPU is not usable" in done.stderr and "--device cpu --tiny" in done.stderr
