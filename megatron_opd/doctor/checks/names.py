"""How a teacher's keys are written in messages: `teacher.*` for the one teacher, `teachers.<name>.*` else."""
from megatron_opd.config import OPDConfig
from megatron_opd.config.models import SINGLE_TEACHER


def teacher_key(cfg: OPDConfig, name: str) -> str:
    return "teacher" if name == SINGLE_TEACHER and not cfg.teachers else f"teachers.{name}"
