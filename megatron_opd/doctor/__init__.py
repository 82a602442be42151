"""opd-doctor: checks a student/teacher pair before training (README, "Checking a pair: opd-doctor"), and
the cheap checks opd-train runs at start-up under `trainer.doctor`."""
from megatron_opd.doctor.report import FAIL, OK, WARN, Finding, Report
from megatron_opd.doctor.runner import CHECKS, run_doctor
from megatron_opd.doctor.startup import DoctorError, startup_checks

__all__ = ["CHECKS", "DoctorError", "FAIL", "Finding", "OK", "Report", "WARN", "run_doctor", "startup_checks"]
