"""opd-train: on-policy distillation (or SFT) of a student on megatron-core.

Run: python -m megatron_opd.train --config-name=distillation_trainer student.path=DIR teacher.path=DIR \
         data.train_files=train.parquet data.val_files=test.parquet [parallel.tensor=2 ...]
     torchrun --nproc-per-node=N -m megatron_opd.train ...   (or srun: SLURM variables are read too)

A bad config, data file, checkpoint or device ends the run at start-up with one line naming the
problem (`error: ...`, exit code 2), before any step; errors after start-up keep their traceback.
"""
import sys

import hydra
from omegaconf.errors import OmegaConfBaseException

from megatron_opd.parallel.quiet import quiet_known_messages
from megatron_opd.config import OPDConfig, to_config
from megatron_opd.config.composition import CONFIG_DIR
from megatron_opd.config.verl_keys import TRAIN_ALIASES, rewrite_argv

STARTUP_EXIT_CODE = 2


def startup_errors() -> tuple:
    """What bad input raises while a run is set up; each message names the key, file or value."""
    from checkpoint_tools.hf_files import CheckpointFileError
    from checkpoint_tools.weights import WeightMismatchError
    from megatron_opd.config import ConfigError
    from megatron_opd.data.config import DataConfigError
    from megatron_opd.data.schema import DataError
    from megatron_opd.models import UnsupportedArchitectureError
    from megatron_opd.parallel import DeviceError, ParallelConfigError
    from megatron_opd.rollout.chat_turns import ChatTurnsError
    from megatron_opd.rollout.sglang_server import SGLangConfigError, ServerStartError
    from megatron_opd.trainer.checkpoint import ResumeError

    return (ChatTurnsError, CheckpointFileError, ConfigError, DataConfigError, DataError, DeviceError, FileNotFoundError,
            ParallelConfigError, ResumeError, SGLangConfigError, ServerStartError, UnsupportedArchitectureError,
            WeightMismatchError)


def start(cfg: OPDConfig):
    """Join the process group on `trainer.device`, run opd-doctor's cheap checks (trainer.doctor) and set the
    run up (models, engine, resume)."""
    import torch.distributed as dist

    from megatron_opd.doctor import startup_checks
    from megatron_opd.parallel import init_distributed, read_launch_env, resolve_device
    from megatron_opd.trainer.loop import Trainer

    launch = read_launch_env()
    device = resolve_device(cfg.trainer.device, launch.local_rank)
    init_distributed(timeout_s=cfg.trainer.collective_timeout_s, launch=launch, device=device)
    startup_checks(cfg, dist.get_world_size(), device, print_report=dist.get_rank() == 0)
    return Trainer(cfg)


def run(cfg: OPDConfig) -> list[dict]:
    """Train with an already validated config in this process."""
    from megatron_opd.parallel import destroy

    try:
        return start(cfg).train()
    finally:
        destroy()


def _fail(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(STARTUP_EXIT_CODE)


@hydra.main(config_path=CONFIG_DIR, config_name="distillation_trainer", version_base=None)
def main(raw) -> None:
    quiet_known_messages()
    try:
        cfg = to_config(raw)
    except (ValueError, OmegaConfBaseException) as err:  # each names the key
        _fail(err)
    from megatron_opd.parallel import destroy

    try:
        trainer = start(cfg)
    except startup_errors() as err:
        destroy()
        _fail(err)
    try:
        trainer.train()
    finally:
        destroy()


def cli() -> None:
    """opd-train, `python -m` and torchrun's `-m`: verl's keys translated (config/verl_keys.py), then main."""
    rewrite_argv(TRAIN_ALIASES)
    main()


if __name__ == "__main__":
    cli()
