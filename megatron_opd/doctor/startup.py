"""opd-train's start-up hook (`trainer.doctor`): the cheap checks only (vocab, temperature, memory; no model
is built), before anything else of the run. warn prints the report; strict also stops the run when a check
fails, with a ConfigError carrying the report (opd-train's start-up errors exit with code 2, no traceback)."""
import sys
from typing import Optional

import torch

from megatron_opd.config import ConfigError, OPDConfig
from megatron_opd.doctor.report import FAIL, Report
from megatron_opd.doctor.runner import cheap_checks
from megatron_opd.parallel import current_device


class DoctorError(ConfigError):
    """trainer.doctor=strict and a check failed; the message is the report."""


def startup_checks(cfg: OPDConfig, world_size: int = 1, device: Optional[torch.device] = None,
                   print_report: bool = True) -> Optional[Report]:
    """The cheap checks under `cfg.trainer.doctor` (off: None, nothing run). Call it on every rank (strict
    must stop them all), with `print_report` on one; `device`: the process group's (default: current_device())."""
    mode = cfg.trainer.doctor
    if mode == "off":
        return None
    report = cheap_checks(cfg, world_size, device or current_device())
    if print_report:
        print(report.text(), file=sys.stderr, flush=True)
    if mode == "strict" and report.status == FAIL:
        raise DoctorError(f"trainer.doctor=strict: a start-up check failed (set trainer.doctor=warn to train "
                          f"anyway):\n{report.text()}")
    return report
