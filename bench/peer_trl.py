"""Our OPD step against TRL's GKDTrainer on this CPU: the same tiny Qwen2 student (0.63M parameters) and teacher
(3.47M), the same synthetic arithmetic prompts, batch 8, fully on-policy (lmbda=1), full-vocabulary JSD
beta=0.5, sampling at T=0.9, AdamW at one lr, fp32, 2 threads, no gradient accumulation, nothing logged,
saved or evaluated inside the timed steps.

Each run is its own process (ours: `python -m megatron_opd.train`; TRL: bench/peer/trl_gkd.py in
bench/.trl-venv, made on first use: TRL and accelerate on top of this venv's torch and transformers, which it
checks are the same). Runs alternate between the systems (TRL, ours, then ours, TRL in the next round) so
machine noise hits both alike. A step's time is TRL's on_step_begin -> on_step_end and ours `timing_s/step`
(metrics.jsonl); the first WARMUP steps of each run are dropped, the rest of all rounds pooled into a median.

Settings that differ, and why:
- TRL's GKDTrainer samples at `temperature` but computes the divergence at 1 (compute_loss does not pass the
  temperature on), so ours runs with actor.kl_temperature=1.0 as well.
- Our step includes pushing the weights to the rollout engine (`timing_s/sync`); TRL generates with the
  model it trains. Our step also includes reading the prompts; TRL collates outside on_step_begin.
- TRL normalises the loss by the token count of the dataset's reference answers (Trainer's
  num_items_in_batch), ours by the sampled response tokens: the same work, another scale.

After the rounds, bench/peer/shared_work.py times the work both trainers do in the same eager PyTorch — the
teacher's forward and the student's forward+backward in transformers on a step-sized batch — and the report
gives its share of TRL's step: the bound on any speed-up over TRL on this machine.

Run: .venv/bin/python bench/peer_trl.py [--rounds 3] [--tokens 32 64] [--steps 30]   (~4 min at 3 rounds)
Results (and the models, prompts, run logs) go to bench/results/peer_trl/ (git-ignored).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from peer.machine import OthersMeter, wait_for_quiet
from peer.ours_step import CPU_KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_VERSION = "1.16.0"
ACCELERATE_VERSION = "1.15.0"
TRL_VENV = os.path.join(REPO, "bench", ".trl-venv")
TRL_WORKER = os.path.join(REPO, "bench", "peer", "trl_gkd.py")
SHARED_WORK = os.path.join(REPO, "bench", "peer", "shared_work.py")
OUT = os.path.join(REPO, "bench", "results", "peer_trl")

# Qwen2 (4 heads, 2 KV heads, tied embeddings) over a 300-token BPE vocabulary: 629,888 and 3,471,616 parameters.
VOCAB = 300
STUDENT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3)
TEACHER = dict(hidden_size=256, intermediate_size=1216, num_hidden_layers=3)
PROMPTS = 1024
DIFFICULTY = 1
BATCH = 8
BETA = 0.5
SAMPLE_TEMPERATURE = 0.9
DIVERGENCE_TEMPERATURE = 1.0  # TRL GKD's (see the docstring)
LR = 1e-5
GRAD_CLIP = 1.0
THREADS = 2
SEED = 1
WARMUP = 5
SYSTEMS = ("trl", "ours")
OUR_PHASES = ("gen", "teacher", "update_actor", "sync")


def run_env(threads: int = THREADS) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore"}


def trl_versions(python: str):
    """The TRL venv's versions as it imports them, or None when it cannot import TRL's GKDTrainer."""
    probe = ("import json, torch, transformers, trl, accelerate; from trl.experimental.gkd import GKDTrainer; "
             "print(json.dumps({m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate)}))")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=run_env())
    return json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else None


def trl_python() -> tuple[str, dict]:
    """bench/.trl-venv's interpreter and versions, built on first use (or when it no longer imports TRL): a venv
    whose .pth file adds this venv's site-packages, so torch and transformers are the project's own."""
    import sysconfig

    import torch
    import transformers

    python = os.path.join(TRL_VENV, "bin", "python")
    versions = trl_versions(python) if os.path.exists(python) else None
    if versions is None or versions["trl"] != TRL_VERSION:
        print(f"building {TRL_VENV} (trl=={TRL_VERSION}, accelerate=={ACCELERATE_VERSION})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", TRL_VENV], check=True)
        site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       text=True).strip()
        with open(os.path.join(site, "project_venv.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        f"trl=={TRL_VERSION}", f"accelerate=={ACCELERATE_VERSION}"], check=True)
        versions = trl_versions(python)
        if versions is None:
            raise SystemExit(f"{TRL_VENV}: TRL's GKDTrainer does not import; see `{python} -c 'import trl'`")
    ours = {"torch": torch.__version__, "transformers": transformers.__version__}
    if any(versions[name] != version for name, version in ours.items()):
        raise SystemExit(f"{TRL_VENV} runs {versions}, not the project's {ours}: rebuild it (delete the folder)")
    return python, versions


def build_assets(root: str) -> dict:
    """Tokenizer, student, teacher (HF checkpoints), our prompt parquet and TRL's jsonl of the same prompts;
    the same files for the same constants, reused once written."""
    from megatron_opd.data import write_rows
    from megatron_opd.demo.arithmetic import synthetic_rows
    from megatron_opd.data.chat import encode_prompt
    from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint
    from transformers import AutoTokenizer

    paths = {name: os.path.join(root, name) for name in ("student", "teacher", "train.parquet", "trl.jsonl")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    rows = list(synthetic_rows(PROMPTS, DIFFICULTY, seed=SEED))
    tokenizer = train_tokenizer([r["prompt"][0]["content"] + " " + r["extra_info"]["answer"] for r in rows], VOCAB)
    if len(tokenizer) != VOCAB:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, not {VOCAB}: the model sizes assume {VOCAB}")
    write_tiny_checkpoint(paths["student"], "qwen2", seed=SEED, tokenizer=tokenizer, **STUDENT)
    write_tiny_checkpoint(paths["teacher"], "qwen2", seed=SEED + 1, tokenizer=tokenizer, **TEACHER)
    write_rows(paths["train.parquet"], rows)
    # As both trainers read it: transformers loads a Qwen2 checkpoint's tokenizer with Qwen2's own pre-tokenizer
    # (one digit per token), which cuts prompts differently from the tokenizer just trained.
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    with open(paths["trl.jsonl"], "w") as f:
        for r in rows:  # TRL's ChatML collator takes the prompt from messages[:-1]; the answer only sets labels
            messages = r["prompt"] + [{"role": "assistant", "content": r["extra_info"]["answer"]}]
            f.write(json.dumps({"messages": messages, "prompt_ids": encode_prompt(tokenizer, r["prompt"])}) + "\n")
    return paths


def parameter_counts(paths: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    return {name: sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths[name]))
                      .parameters()) for name in ("student", "teacher")}


def our_overrides(paths: dict, tokens: int, steps: int, save_dir: str) -> list[str]:
    return [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}", "student.dtype=float32",
            "teacher.dtype=float32", f"data.train_files={paths['train.parquet']}", f"data.train_batch_size={BATCH}",
            "data.max_prompt_length=128", f"data.seed={SEED}", "rollout.engine=local", "rollout.n=1",
            f"rollout.temperature={SAMPLE_TEMPERATURE}", "rollout.top_p=1.0", "rollout.top_k=-1",
            f"rollout.response_length={tokens}", "actor.kl_loss_type=jsd", f"actor.jsd_beta={BETA}",
            f"actor.kl_temperature={DIVERGENCE_TEMPERATURE}", f"actor.micro_batch_size={BATCH}",
            f"actor.optim.lr={LR}", "actor.optim.lr_decay=constant", "actor.optim.weight_decay=0.0",
            f"actor.grad_clip={GRAD_CLIP}", f"trainer.total_steps={steps}", f"trainer.seed={SEED}",
            "trainer.device=cpu", "trainer.logger=[jsonl]", "trainer.export_hf=false", "trainer.resume=never",
            f"trainer.save_dir={save_dir}"]


def run_ours(paths: dict, tokens: int, args, run_dir: str) -> dict:
    """Per-step seconds (`timing_s/step`) and per phase, after the warm-up steps."""
    # As a module from the repository root, like `python -m megatron_opd.train`: this tree's code runs.
    command = [sys.executable, "-m", "bench.peer.ours_step", *our_overrides(paths, tokens, args.steps, run_dir)]
    others = run_logged(command, run_dir, "ours", args.threads)
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps_kept = [line for line in lines if "timing_s/step" in line][WARMUP:]
    return {"step_s": [s["timing_s/step"] for s in steps_kept], "cpu_s": [s[CPU_KEY] for s in steps_kept],
            "others": others,
            **{phase: [s[f"timing_s/{phase}"] for s in steps_kept] for phase in OUR_PHASES}}


def run_trl(python: str, paths: dict, tokens: int, args, run_dir: str) -> dict:
    out = os.path.join(run_dir, "trl_times.json")
    command = [python, TRL_WORKER, "--student", paths["student"], "--teacher", paths["teacher"],
               "--prompts", paths["trl.jsonl"], "--out", out, "--tokens", str(tokens), "--steps", str(args.steps),
               "--batch", str(BATCH), "--lr", str(LR), "--beta", str(BETA), "--temperature", str(SAMPLE_TEMPERATURE),
               "--grad-clip", str(GRAD_CLIP), "--threads", str(args.threads), "--seed", str(SEED)]
    others = run_logged(command, run_dir, "trl", args.threads)
    times = json.load(open(out))
    return {"step_s": times["step_s"][WARMUP:], "cpu_s": times["cpu_s"][WARMUP:], "others": others}


def run_logged(command: list, run_dir: str, system: str, threads: int) -> float:
    """Runs `command` with its output in run_dir/log.txt; the cores' worth of CPU other processes took meanwhile."""
    meter = OthersMeter()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        meter.start()
        code = subprocess.run(command, cwd=REPO, env=run_env(threads), stdout=log, stderr=subprocess.STDOUT).returncode
        others = meter.stop()
    if code:
        with open(os.path.join(run_dir, "log.txt")) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{system} run failed (exit {code}); log: {run_dir}/log.txt\n{tail}")
    return others


def shared_work(paths: dict, tokens: int, args) -> dict:
    """The teacher's forward and the student's forward+backward in transformers on a step's batch (ms)."""
    command = [sys.executable, SHARED_WORK, "--student", paths["student"], "--teacher", paths["teacher"],
               "--prompts", paths["trl.jsonl"], "--tokens", str(tokens), "--batch", str(BATCH),
               "--threads", str(args.threads)]
    wait_for_quiet(args.quiet_below, args.max_wait)
    done = subprocess.run(command, cwd=REPO, env=run_env(args.threads), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{SHARED_WORK} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def median_ms(values: list) -> float:
    return 1000 * statistics.median(values)


def report(results: dict, loads: list, args, versions: dict, counts: dict, floors: dict) -> str:
    lines = [f"TRL {versions['trl']} GKDTrainer against megatron-opd (torch {versions['torch']}, transformers "
             f"{versions['transformers']}, accelerate {versions['accelerate']}); {args.rounds} round(s) of "
             f"{args.steps} steps per system, the first {WARMUP} of each run dropped",
             f"student {counts['student']:,} parameters {STUDENT}, teacher {counts['teacher']:,} {TEACHER}, "
             f"vocab {VOCAB}; batch {BATCH}, JSD beta={BETA}, sampling T={SAMPLE_TEMPERATURE}, fp32, {args.threads} thread(s)",
             "", "| new tokens | TRL step (ms) | ours step (ms) | ours / TRL | speed-up (TRL / ours) | "
             "per-round medians TRL / ours (ms) | ours: gen / teacher / update / sync (ms) |", "|---|---|---|---|---|---|---|"]
    for tokens in args.tokens:
        pooled = {s: [t for r in results[tokens][s] for t in r["step_s"]] for s in SYSTEMS}
        trl, ours = median_ms(pooled["trl"]), median_ms(pooled["ours"])
        rounds = " / ".join(", ".join(f"{median_ms(r['step_s']):.0f}" for r in results[tokens][s]) for s in SYSTEMS)
        phases = " / ".join(f"{median_ms([t for r in results[tokens]['ours'] for t in r[p]]):.1f}" for p in OUR_PHASES)
        lines.append(f"| {tokens} | {trl:.1f} | {ours:.1f} | {ours / trl:.2f} | {trl / ours:.2f}x | {rounds} | {phases} |")
    lines += ["", "Work both trainers do in the same eager PyTorch (transformers' models, medians of 15): no step of "
                  "either can be shorter.", "", "| new tokens | batch | teacher forward (ms) | student forward+backward "
                  "(ms) | their sum / TRL step |", "|---|---|---|---|---|"]
    for tokens in args.tokens:
        floor, trl = floors[tokens], median_ms([t for r in results[tokens]["trl"] for t in r["step_s"]])
        shared = floor["teacher_forward"] + floor["student_forward_backward"]
        lines.append(f"| {tokens} | {floor['batch']} | {floor['teacher_forward']:.1f} | "
                     f"{floor['student_forward_backward']:.1f} | {shared / trl:.2f} |")
    others = [r["others"] for by_system in results.values() for runs in by_system.values() for r in runs]
    ones = [load[0] for load in loads]
    lines += ["", f"other processes' CPU during the kept runs (cores): median {statistics.median(others):.2f}, max "
                  f"{max(others):.2f}; 1-minute load average at the runs' starts: median {statistics.median(ones):.2f}, "
                  f"max {max(ones):.2f} ({os.cpu_count()} cores)"]
    if max(others) >= args.quiet_below:
        lines.append(f"WARNING: some runs shared the machine (others >= {args.quiet_below} cores): their times are "
                     f"not comparable; rerun on an idle machine")
    return "\n".join(lines)


def measure(system: str, python: str, paths: dict, tokens: int, args, run_dir: str, loads: list) -> dict:
    """One run, on a quiet machine if one comes within --max-wait; rerun while other processes took
    --quiet-below cores or more during it, up to --retries times."""
    for attempt in range(args.retries + 1):
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        wait_for_quiet(args.quiet_below, args.max_wait)
        loads.append(os.getloadavg())
        if system == "trl":
            result = run_trl(python, paths, tokens, args, run_dir)
        else:
            result = run_ours(paths, tokens, args, run_dir)
        if result["others"] < args.quiet_below:
            break
        print(f"    {system} {tokens}: other processes took {result['others']:.2f} cores during the run"
              + ("; again" if attempt < args.retries else "; kept, flagged"), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each system at each length")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64], help="max new tokens per response")
    parser.add_argument("--steps", type=int, default=30, help=f"steps per run (the first {WARMUP} are dropped)")
    parser.add_argument("--quiet-below", type=float, default=0.3,
                        help="cores' worth of CPU other processes may use during a run (more: wait, rerun)")
    parser.add_argument("--max-wait", type=float, default=60, help="seconds to wait for a quiet machine per run")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a run the machine was busy during")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads per system (1 stands a shared machine far better; see machine.py)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    python, versions = trl_python()
    paths = build_assets(os.path.join(OUT, "assets"))
    counts = parameter_counts(paths)
    results = {tokens: {s: [] for s in SYSTEMS} for tokens in args.tokens}
    loads = []
    for round_ in range(args.rounds):
        for tokens in args.tokens:
            for system in SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]:
                started = time.perf_counter()
                run_dir = os.path.join(OUT, "runs", f"{system}_{tokens}_{round_}")
                result = measure(system, python, paths, tokens, args, run_dir, loads)
                results[tokens][system].append(result)
                print(f"round {round_ + 1}/{args.rounds} {system:>4} {tokens} tokens: median step "
                      f"{median_ms(result['step_s']):.1f} ms ({time.perf_counter() - started:.0f} s, others "
                      f"{result['others']:.2f} cores)", flush=True)
    floors = {tokens: shared_work(paths, tokens, args) for tokens in args.tokens}
    table = report(results, loads, args, versions, counts, floors)
    print("\n" + table)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"results": results, "loads": loads, "versions": versions, "table": table}, f)


if __name__ == "__main__":
    main()
