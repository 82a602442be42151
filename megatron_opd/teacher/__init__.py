"""The teacher: a frozen megatron model on the trainer's ranks (in the student's layout or its own), or a
model on its own SGLang server; what it keeps of a pass, and how that reaches the student's loss."""
from megatron_opd.teacher.megatron_teacher import MegatronTeacher


def make_teacher(cfg, dtype: str, vocab_size: int, student, student_vocab_shard: int):
    """Collective. `teacher.engine`: megatron (on the trainer's ranks) or sglang (its own server)."""
    from megatron_opd.teacher.layout import teacher_layout
    from megatron_opd.trainer.config import divergence_temperature

    if cfg.teacher.engine == "sglang":
        from megatron_opd.teacher.served import ServedTeacher

        return ServedTeacher(cfg, student, vocab_size)
    layout = teacher_layout(cfg)
    return MegatronTeacher(cfg.teacher.path, dtype, layout, cfg.actor, divergence_temperature(cfg), vocab_size,
                           student, student_vocab_shard)


__all__ = ["MegatronTeacher", "make_teacher"]
