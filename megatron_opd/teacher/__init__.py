"""The teacher: a frozen megatron model on the trainer's ranks (in the student's layout or its own), or a
model on its own SGLang server, behind one interface (teacher/interface.py); several of them routed by each
row's data source (teacher/routed.py); what a teacher keeps of a pass, and how that reaches the student's
loss."""
from megatron_opd.teacher.interface import Teacher
from megatron_opd.teacher.megatron_teacher import MegatronTeacher
from megatron_opd.teacher.routed import RoutedTeachers


def make_teacher(cfg, teacher, key: str, dtype: str, vocab_size: int, student, student_vocab_shard: int,
                 cross=None, name: str = "teacher") -> Teacher:
    """Collective. One teacher of the run (`teacher`: its TeacherConfig, `key`: teacher or teachers.<name>), by
    its engine: megatron (on the trainer's ranks) or sglang (its own server); `cross`: its tokenizer's
    alignment with the student's (trainer/cross_rows.CrossTokens) when it has another."""
    from megatron_opd.config import divergence_temperature, teacher_layout
    from megatron_opd.parallel.own_layout import own_layout_dims

    if teacher.engine == "sglang":
        from megatron_opd.teacher.served import ServedTeacher

        return ServedTeacher(cfg, teacher, student, vocab_size, key)
    layout = teacher_layout(cfg, teacher)
    own_dims = None if layout is None else own_layout_dims(layout, student)
    if cross is None:
        return MegatronTeacher(teacher.path, dtype, student, own_dims, cfg.actor, divergence_temperature(cfg),
                               vocab_size, student_vocab_shard)
    from megatron_opd.models import load_arch
    from megatron_opd.teacher.cross import CrossTokenizerTeacher

    # whole sequences of its own ids, in its own layout or the student's; over its own vocabulary
    own_vocab = min(len(cross.teacher), load_arch(teacher.path).vocab_size)
    inner = MegatronTeacher(teacher.path, dtype, student, own_dims or student, cfg.actor, divergence_temperature(cfg),
                            own_vocab, student_vocab_shard, unshared=cross.shared.unshared_teacher(own_vocab))
    pad = cross.tokenizer.pad_token_id
    return CrossTokenizerTeacher(inner, name, cross.teacher_end if pad is None else pad,
                                 cross.shared.student_to_teacher, student_vocab_shard)


__all__ = ["MegatronTeacher", "RoutedTeachers", "Teacher", "make_teacher"]
