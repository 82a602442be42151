"""The CLI: exit codes and what it prints. The conversion and a parity check run in their own process as a user
runs them; the refusals run its main() in a forked one (tests/runs.py: forked)."""
import subprocess
import sys

from checkpoint_tools.cli import main
from megatron_opd.demo.tiny import write_tiny_checkpoint
from tests.runs import forked


def opd_convert(*args):
    return subprocess.run([sys.executable, "-m", "checkpoint_tools", *args], capture_output=True, text=True,
                          timeout=300)


def test_convert_then_verify(tiny_models, tiny_tokenizer, tmp_path):
    out = tmp_path / "mcore"
    done = opd_convert("hf-to-mcore", "--hf", tiny_models["qwen2"], "--out", str(out))
    assert done.returncode == 0 and f"wrote {out}" in done.stdout, done.stderr
    checked = opd_convert("verify", "--hf", tiny_models["qwen2"], "--mcore", str(out), "--tp", "2")
    assert checked.returncode == 0 and "TP=2 PP=1" in checked.stdout and checked.stdout.rstrip().endswith("OK")

    other_weights = write_tiny_checkpoint(str(tmp_path / "other"), "qwen2", seed=123, tokenizer=tiny_tokenizer)
    code, stdout, _ = forked(tmp_path, main, ["verify", "--hf", other_weights, "--mcore", str(out)])
    assert code == 1 and stdout.rstrip().endswith("FAIL")

    code, _, stderr = forked(tmp_path, main, ["hf-to-mcore", "--hf", tiny_models["qwen2"], "--out", str(out)])
    assert code == 2 and "output directory already exists" in stderr
