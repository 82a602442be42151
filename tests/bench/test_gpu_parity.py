"""bench/gpu_parity.py through its command line on tiny shapes (CPU): megatron's logits of the dense and the
MoE student equal transformers' and the report says where megatron ran and how the MoE routed."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_parity_passes_and_reports_the_figures(tmp_path):
    out = tmp_path / "parity.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_parity.py"), "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    for name in ("dense", "moe"):
        assert report[name]["megatron_device"] == "cpu" and report[name]["params"] > 0
        assert report[name]["max_abs_logprob"] < 1e-5 and report[name]["max_abs_logit"] < 1e-5, report[name]
    routing = report["moe"]["hf_routing_load_max_over_mean"]  # tiny MoE: 3 layers, 4 experts, top-2
    assert len(routing) == 3 and all(1 <= r <= 2 for r in routing)
