"""opd-train: on-policy distillation (or SFT) of a student on megatron-core.

Run: python -m megatron_opd.train --config-name=distillation_trainer student.path=DIR teacher.path=DIR \
         data.train_files=train.parquet data.val_files=test.parquet [parallel.tensor=2 ...]
     torchrun --nproc-per-node=N -m megatron_opd.train ...   (or srun: SLURM variables are read too)
"""
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf.errors import OmegaConfBaseException

from megatron_opd.parallel.quiet import quiet_known_messages
from megatron_opd.trainer.config import OPDConfig, to_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ConfigStore.instance().store(name="opd_schema", node=OPDConfig)


def run(cfg: OPDConfig) -> list[dict]:
    """Train with an already validated config in this process's group (joined here if needed)."""
    from megatron_opd.parallel import destroy, init_distributed
    from megatron_opd.trainer.loop import Trainer

    init_distributed()
    try:
        return Trainer(cfg).train()
    finally:
        destroy()


@hydra.main(config_path=CONFIG_DIR, config_name="distillation_trainer", version_base=None)
def main(raw) -> None:
    quiet_known_messages()
    try:
        cfg = to_config(raw)
    except (ValueError, OmegaConfBaseException) as err:  # each names the key
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(cfg)


if __name__ == "__main__":
    main()
