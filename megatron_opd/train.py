"""opd-train: on-policy distillation (or SFT) of a student on megatron-core.

Run: python -m megatron_opd.train --config-name=distillation_trainer student.path=DIR teacher.path=DIR \
         data.train_files=train.parquet data.val_files=test.parquet [parallel.tensor=2 ...]
     torchrun --nproc-per-node=N -m megatron_opd.train ...   (or srun: SLURM variables are read too)

A bad config, data file, checkpoint or device ends the run at start-up with one line naming the
problem (`error: ...`, exit code 2), before any step; errors after start-up keep their traceback.
"""
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf.errors import OmegaConfBaseException

from megatron_opd.parallel.quiet import quiet_known_messages
from megatron_opd.config import OPDConfig, to_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ConfigStore.instance().store(name="opd_schema", node=OPDConfig)
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
    from megatron_opd.rollout.sglang_server import SGLangConfigError, ServerStartError
    from megatron_opd.trainer.checkpoint import ResumeError

    return (CheckpointFileError, ConfigError, DataConfigError, DataError, DeviceError, FileNotFoundError,
            ParallelConfigError, ResumeError, SGLangConfigError, ServerStartError, UnsupportedArchitectureError,
            WeightMismatchError)


def start(cfg: OPDConfig):
    """Join the process group on `trainer.device` and set the run up (models, engine, resume)."""
    from megatron_opd.parallel import init_distributed, read_launch_env, resolve_device
    from megatron_opd.trainer.loop import Trainer

    launch = read_launch_env()
    init_distributed(timeout_s=cfg.trainer.collective_timeout_s, launch=launch,
                     device=resolve_device(cfg.trainer.device, launch.local_rank))
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


if __name__ == "__main__":
    main()
