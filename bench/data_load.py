"""Prompt dataset start-up cost on a large file: time and peak memory to open N synthetic prompts (parquet
and jsonl) and to read items from it, and the one-pass cost of `filter_overlong_prompts=True`.

Each case runs in a fresh process that first imports everything and builds the tiny tokenizer; the memory
reported is that process's peak RSS from then on (Linux VmHWM, reset through /proc/self/clear_refs) above
its RSS at that point, so it counts what the dataset itself holds. "arrow MiB" is the Arrow data in it;
the rest of a parquet case is mostly the arena that Arrow's allocator (mimalloc) keeps after decoding.
Reading draws shuffled batches from `PromptSampler` (random access, as in training). `max_prompt_length` is
the median token count of the first prompts, so the filter drops a good share and the other cases truncate
those on the left. Each figure is the best of --reps fresh processes.

Run: .venv/bin/python bench/data_load.py [--rows 100000] [--difficulty 1] [--items 512] [--reps 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "parquet": dict(suffix=".parquet", filter_overlong_prompts=False),
    "jsonl": dict(suffix=".jsonl", filter_overlong_prompts=False),
    "parquet + filter": dict(suffix=".parquet", filter_overlong_prompts=True),
}


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(case: str, path: str, items: int, max_prompt_length: int) -> None:
    import pyarrow

    from megatron_opd.data import PromptDataset, PromptSampler
    from megatron_opd.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is this case's own
    before = status_mib("VmRSS")
    start = time.perf_counter()
    dataset = PromptDataset(path, tokenizer, max_prompt_length=max_prompt_length, truncation="left",
                            filter_overlong_prompts=CASES[case]["filter_overlong_prompts"])
    open_s = time.perf_counter() - start
    sampler = PromptSampler(len(dataset), batch_size=64, seed=0)
    start = time.perf_counter()
    for _ in range(items // 64):
        for index in sampler.next_batch():
            dataset[index]
    read_s = time.perf_counter() - start
    print(json.dumps(dict(open_s=open_s, items_per_s=(items // 64) * 64 / read_s, kept=len(dataset),
                          peak_mb=status_mib("VmHWM") - before, arrow_mb=pyarrow.total_allocated_bytes() / 2**20)))


def write_inputs(folder: str, rows: int, difficulty: int) -> dict:
    from megatron_opd.demo.arithmetic import synthetic_rows, write_synthetic_parquet

    paths = {".parquet": os.path.join(folder, "prompts.parquet"), ".jsonl": os.path.join(folder, "prompts.jsonl")}
    start = time.perf_counter()
    write_synthetic_parquet(paths[".parquet"], rows, difficulty=difficulty)
    print(f"wrote {rows} rows (difficulty {difficulty}): parquet {os.path.getsize(paths['.parquet']) / 2**20:.1f} "
          f"MiB in {time.perf_counter() - start:.2f}s", end="")
    with open(paths[".jsonl"], "w") as f:
        for row in synthetic_rows(rows, difficulty=difficulty):
            f.write(json.dumps(row) + "\n")
    print(f", jsonl {os.path.getsize(paths['.jsonl']) / 2**20:.1f} MiB")
    return paths


def median_prompt_length(path: str, sample: int = 256) -> int:
    from megatron_opd.data import PromptDataset
    from megatron_opd.demo.tiny import train_tokenizer

    dataset = PromptDataset(path, train_tokenizer(), max_prompt_length=1 << 30)
    return int(statistics.median(len(dataset[i]["input_ids"]) for i in range(min(sample, len(dataset)))))


def run_case(case: str, path: str, items: int, max_prompt_length: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--items", str(items), "--max-prompt-length",
                             str(max_prompt_length), "--child", case, path], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{case} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--items", type=int, default=512, help="items read after opening (multiple of 64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-prompt-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.items, args.max_prompt_length)
        return
    with tempfile.TemporaryDirectory() as folder:
        paths = write_inputs(folder, args.rows, args.difficulty)
        limit = median_prompt_length(paths[".parquet"])
        print(f"max_prompt_length={limit} (median); best of {args.reps} fresh processes per case")
        print(f"{'case':<18}{'open s':>8}{'items/s':>10}{'peak MiB':>10}{'arrow MiB':>10}{'kept':>9}")
        for case, spec in CASES.items():
            runs = [run_case(case, paths[spec["suffix"]], args.items, limit) for _ in range(args.reps)]
            print(f"{case:<18}{min(r['open_s'] for r in runs):>8.3f}{max(r['items_per_s'] for r in runs):>10.0f}"
                  f"{min(r['peak_mb'] for r in runs):>10.1f}{runs[0]['arrow_mb']:>10.1f}{runs[0]['kept']:>9}")


if __name__ == "__main__":
    main()
