"""Converter throughput and memory: HF -> Megatron and Megatron -> HF against a plain copy of the same
bytes measured in the same run, and each conversion's peak RSS against the model's size.

Each conversion runs in a fresh process that first imports everything and joins a one-process group, then
times the conversion call alone; its peak RSS is the child's ru_maxrss, set against a process that only
does the imports and the group set-up (the fixed cost of torch + megatron).

Run: .venv/bin/python bench/convert.py [--hidden 1024 --layers 8 --vocab 32000] [--dtype bfloat16]
"""
import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from megatron_opd.demo.tiny import tiny_hf_config

def child(what: str, src: str, dst: str) -> None:
    from megatron_opd.parallel.quiet import quiet_known_messages

    quiet_known_messages()
    from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf, single_process_model_parallel

    with single_process_model_parallel():
        start = time.perf_counter()
        if what == "hf-to-mcore":
            hf_to_mcore(src, dst)
        elif what == "mcore-to-hf":
            mcore_to_hf(src, dst)
        print(f"in {time.perf_counter() - start:.3f}s")


def child_peak_rss(cmd) -> tuple[str, float]:
    """Run cmd in a fresh process; return its stdout and its peak RSS in bytes (via a wrapper process so
    that RUSAGE_CHILDREN holds this child alone)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr);"
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"PEAK (\d+)", done.stdout).group(1))
    return done.stdout, peak_kib * 1024.0


def write_model(out_dir, hidden, layers, vocab, dtype) -> int:
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reported_seconds(stdout: str) -> float:
    return float(re.search(r"in ([\d.]+)s", stdout).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    root = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        hf_dir, mcore_dir, back_dir = (os.path.join(root, name) for name in ("hf", "mcore", "hf_back"))
        model_bytes = write_model(hf_dir, args.hidden, args.layers, args.vocab, args.dtype)
        weights = os.path.join(hf_dir, "model.safetensors")
        start = time.perf_counter()
        shutil.copyfile(weights, os.path.join(root, "copy.safetensors"))
        copy_s = time.perf_counter() - start

        me = [sys.executable, os.path.abspath(__file__), "--child"]
        _, import_rss = child_peak_rss(me + ["nothing", hf_dir, mcore_dir])
        out, to_mcore_rss = child_peak_rss(me + ["hf-to-mcore", hf_dir, mcore_dir])
        to_mcore_s = reported_seconds(out)
        out, to_hf_rss = child_peak_rss(me + ["mcore-to-hf", mcore_dir, back_dir])
        to_hf_s = reported_seconds(out)

        gb = model_bytes / 1e9
        print(f"model: qwen2 hidden={args.hidden} layers={args.layers} vocab={args.vocab} {args.dtype}, "
              f"{gb:.3f} GB of weights; machine: {os.cpu_count()} CPUs")
        print(f"{'what':14} {'seconds':>8} {'GB/s':>7} {'vs copy':>8} {'peak RSS GB':>12} {'(RSS-setup)/model':>20}")
        print(f"{'plain copy':14} {copy_s:8.2f} {gb / copy_s:7.2f} {1.0:8.2f} {'':>12} {'':>20}")
        for name, seconds, rss in (("hf-to-mcore", to_mcore_s, to_mcore_rss), ("mcore-to-hf", to_hf_s, to_hf_rss)):
            print(f"{name:14} {seconds:8.2f} {gb / seconds:7.2f} {copy_s / seconds:8.2f} {rss / 1e9:12.2f} "
                  f"{(rss - import_rss) / model_bytes:20.2f}")
        print(f"{'set-up only':14} {'':>8} {'':>7} {'':>8} {import_rss / 1e9:12.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
