"""opd-doctor: checks a student/teacher pair before training, with opd-train's config (the same
--config-name and Hydra overrides). Exit code 0 when every check is ok, 1 when one warns, 2 when one fails.

    opd-doctor student.path=DIR teacher.path=DIR data.train_files=train.parquet [--json] [--cheap]
        [--checks vocab,self_test] [--world-size N]
"""
import argparse
import sys

from omegaconf.errors import OmegaConfBaseException

from megatron_opd.config.composition import compose_run_config
from megatron_opd.config.verl_keys import TRAIN_ALIASES, VerlKeyError, translate

USAGE_EXIT_CODE = 2  # a config that does not compose fails as a failing check would


def parse_args(argv: list):
    from megatron_opd.doctor.runner import CHEAP, CHECKS

    parser = argparse.ArgumentParser(prog="opd-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as a JSON document")
    parser.add_argument("--cheap", action="store_true", help=f"only the checks that build no model: {','.join(CHEAP)}")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {','.join(CHECKS)}")
    parser.add_argument("--world-size", type=int, default=None,
                        help="the run's processes, for the memory check (default: parallel.tensor x pipeline x "
                             "context)")
    parser.add_argument("--config-name", "-cn", default="distillation_trainer")
    args, overrides = parser.parse_known_args(argv)
    checks = CHEAP if args.cheap else tuple(c for c in args.checks.split(",") if c)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown {','.join(unknown)}; choose from {','.join(CHECKS)}")
    return args, checks, overrides


def main(argv=None) -> int:
    from megatron_opd.parallel.quiet import quiet_known_messages

    quiet_known_messages()
    args, checks, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides, notices = translate(overrides, TRAIN_ALIASES)  # opd-train's keys, verl's too
        for notice in notices:
            print(f"notice: {notice}", file=sys.stderr, flush=True)
        cfg = compose_run_config(args.config_name, overrides)
    except (VerlKeyError, ValueError, OmegaConfBaseException) as err:  # each names the key
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE
    from megatron_opd.doctor.runner import run_doctor

    report = run_doctor(cfg, checks, world_size=args.world_size)
    print(report.to_json() if args.json else report.text(), flush=True)
    return report.exit_code


def console() -> None:
    sys.exit(main())
