"""opd-convert: Hugging Face <-> Megatron (torch_dist) checkpoints.

Run: python -m checkpoint_tools hf-to-mcore --hf DIR --out DIR
     python -m checkpoint_tools mcore-to-hf --mcore DIR --out DIR [--max-shard-gb 5]
     python -m checkpoint_tools verify --hf DIR --mcore DIR [--tp N --pp N] [--tolerance 1e-4]
"""
import argparse
import sys
import time

from megatron_opd.parallel.quiet import quiet_known_messages


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="HF safetensors -> megatron torch_dist (+ config, tokenizer)")
    to_mcore.add_argument("--hf", required=True)
    to_mcore.add_argument("--out", required=True)
    to_hf = commands.add_parser("mcore-to-hf", help="megatron torch_dist -> HF safetensors (+ config, tokenizer)")
    to_hf.add_argument("--mcore", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0)
    check = commands.add_parser("verify", help="compare the logits of an HF and a converted checkpoint")
    check.add_argument("--hf", required=True)
    check.add_argument("--mcore", required=True)
    check.add_argument("--tp", type=int, default=1)
    check.add_argument("--pp", type=int, default=1)
    check.add_argument("--tolerance", type=float, default=1e-4)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    quiet_known_messages()
    from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf
    from checkpoint_tools.verify import verify
    from megatron_opd.parallel import ParallelConfig

    start = time.time()
    try:
        if args.command == "hf-to-mcore":
            print(f"wrote {hf_to_mcore(args.hf, args.out)} in {time.time() - start:.1f}s")
        elif args.command == "mcore-to-hf":
            print(f"wrote {mcore_to_hf(args.mcore, args.out, int(args.max_shard_gb * 2**30))} "
                  f"in {time.time() - start:.1f}s")
        else:
            parity = verify(args.hf, args.mcore, ParallelConfig(tensor=args.tp, pipeline=args.pp))
            verdict = "OK" if parity.within(args.tolerance) else "FAIL"
            print(f"TP={args.tp} PP={args.pp}: max|Δ logit|={parity.max_abs_logit:.3e} "
                  f"max|Δ log-prob|={parity.max_abs_logprob:.3e} tolerance={args.tolerance:g} {verdict}")
            return 0 if verdict == "OK" else 1
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"opd-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
