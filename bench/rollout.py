"""Rollout engines, two sections:

- `embedded`: the embedded engine's generation time against transformers' `generate` (the engine before
  its decode loop, same call, logits kept for the log-probs) on the tiny Qwen2 student of the tests
  (hidden 64, 4 layers, 300 tokens), 8 prompts x n=1, 32 and 64 new tokens at temperature 0.9, fp32,
  `--threads` threads: the median over `--repeats` alternating runs of each, and their ratio.
- `sglang`: weight-sync time per route (tensor / distributed / disk) against model size, and generated
  tokens/s of the SGLang engine and the embedded engine on the same prompts. The SGLang server runs on this
  machine's CPU (fp32) with the FAKE kernel package from tests/ on its path; on a GPU machine drop
  --fake-kernels.

Run: .venv/bin/python bench/rollout.py [--only embedded|sglang] [--threads 2] [--repeats 15]
     [--sizes 256x4 512x8 1024x8] [--vocab 32000] [--fake-kernels]
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from megatron_opd.demo.tiny import tiny_hf_config, train_tokenizer, write_tiny_checkpoint
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import SamplingParams
from megatron_opd.rollout.sglang_engine import SGLangEngine
from megatron_opd.rollout.sglang_server import SGLangConfig

STUB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "sglang_stub")


def write_model(out_dir, hidden, layers, vocab):
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
                            num_key_value_heads=4, tie_word_embeddings=False, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return model


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tokens_per_s(engine, prompts, sampling):
    start = time.perf_counter()
    samples = engine.generate(prompts, sampling)
    return sum(len(s.response_ids) for s in samples) / (time.perf_counter() - start)


def transformers_generate(model, rows, sampling, pad_id, stop_ids):
    """The embedded engine before its decode loop: `generate` on the left-padded rows, its logits kept for the
    log-probs under the temperature-scaled distribution."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
                         do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None,
                         eos_token_id=stop_ids, pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    responses = out.sequences[:, width:]
    logprobs = torch.stack(out.logits, 1).float().div(sampling.temperature).log_softmax(-1)
    return responses.tolist(), logprobs.gather(-1, responses[..., None])[..., 0].tolist()


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_embedded(args):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench_embedded_")
    try:
        # The tests' distill_setup student.
        path = write_tiny_checkpoint(os.path.join(root, "student"), "qwen2", seed=1, tokenizer=train_tokenizer())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = model.generation_config
        prompts = [[(7 * i + j) % 250 + 10 for j in range(20 + 4 * i)] for i in range(8)]  # 20..48 tokens
        print(f"{'new tokens':>10} | {'generate s':>10} {'engine s':>9} {'ratio':>6}")
        with EmbeddedEngine(path) as engine:
            for new_tokens in (32, 64):
                sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.9, seed=0)
                times = {"generate": [], "engine": []}
                for _ in range(args.repeats):
                    times["generate"].append(seconds(lambda: transformers_generate(
                        model, prompts, sampling, config.pad_token_id, [config.eos_token_id])))
                    times["engine"].append(seconds(lambda: engine.generate(prompts, sampling)))
                theirs, ours = (statistics.median(times[k]) for k in ("generate", "engine"))
                print(f"{new_tokens:>10} | {theirs:10.4f} {ours:9.4f} {theirs / ours:6.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads; {len(prompts)} prompts x n=1, temperature 0.9, "
          f"fp32; medians of {args.repeats} alternating runs")


def bench_sglang(args):
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(16)] for i in range(8)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    print(f"{'model':>9} {'MB':>7} | {'sync s: tensor':>14} {'distributed':>11} {'disk':>7} | "
          f"{'tok/s: sglang':>13} {'embedded':>8} {'ratio':>6}")
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        root = tempfile.mkdtemp(prefix="bench_rollout_")
        try:
            model = write_model(os.path.join(root, "hf"), hidden, layers, args.vocab)
            named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
            megabytes = sum(t.numel() * t.element_size() for _, t in named) / 2**20
            config = SGLangConfig(dtype="float32", max_total_tokens=4096, log_path=os.path.join(root, "server.log"),
                                  pythonpath=[STUB] if args.fake_kernels else [])
            engine = SGLangEngine(os.path.join(root, "hf"), config, keep_snapshot=False)
            engine.start()
            try:
                sync = {}
                for route in ("tensor", "distributed", "disk"):
                    config.weight_sync = route
                    sync[route] = best_of(2, lambda: engine.update_weights(named, engine.weight_version + 1))
                sglang_tps = tokens_per_s(engine, prompts, sampling)
            finally:
                engine.stop()
            with EmbeddedEngine(os.path.join(root, "hf")) as embedded:
                embedded_tps = tokens_per_s(embedded, prompts, sampling)
            print(f"{size:>9} {megabytes:7.1f} | {sync['tensor']:14.2f} {sync['distributed']:11.2f} "
                  f"{sync['disk']:7.2f} | {sglang_tps:13.1f} {embedded_tps:8.1f} {sglang_tps / embedded_tps:6.2f}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, {'CUDA' if torch.cuda.is_available() else 'no GPU'}; "
          f"{len(prompts)} prompts x {args.new_tokens} new tokens, temperature 1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["embedded", "sglang"], help="one section (default: both)")
    parser.add_argument("--threads", type=int, default=2, help="embedded section: torch threads")
    parser.add_argument("--repeats", type=int, default=15, help="embedded section: runs of each")
    parser.add_argument("--sizes", nargs="+", default=["256x4", "512x8", "1024x8"], help="HIDDENxLAYERS")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--fake-kernels", action="store_true", default=not torch.cuda.is_available())
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.only in (None, "embedded"):
        bench_embedded(args)
    if args.only in (None, "sglang"):
        bench_sglang(args)


if __name__ == "__main__":
    main()
