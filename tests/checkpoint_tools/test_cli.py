"""The real CLI in its own process: exit codes and what it prints."""
import subprocess
import sys

from megatron_opd.demo.tiny import write_tiny_checkpoint


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
    mismatch = opd_convert("verify", "--hf", other_weights, "--mcore", str(out))
    assert mismatch.returncode == 1 and mismatch.stdout.rstrip().endswith("FAIL")

    refused = opd_convert("hf-to-mcore", "--hf", tiny_models["qwen2"], "--out", str(out))
    assert refused.returncode == 2 and "output directory already exists" in refused.stderr
