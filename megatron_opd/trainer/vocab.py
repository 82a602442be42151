"""Can this teacher teach this student token by token? Decided by the tokenizers' content, not their files
or the configs' vocabulary sizes, which models pad differently (Qwen2.5-0.5B: 151936 rows, Qwen2.5-7B:
152064, one tokenizer of 151665 entries).

The pair is compatible when every token below the smaller tokenizer's length has the same id in both, and
the special tokens agree. The divergences then run over that shared vocabulary: ids at or above it —
padding rows, and rows one model has and the other lacks — are masked on both sides before the softmax.
"""
import os

from megatron_opd.config import ConfigError

SHOWN = 5  # differing tokens named in the error
# One of these holds a tokenizer's vocabulary; without any, transformers quietly builds a stand-in.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, key: str):
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        raise ConfigError(f"{key}={path}: no tokenizer ({' / '.join(VOCABULARY_FILES)}); the model directory needs "
                          f"its tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={path}: no usable tokenizer ({type(err).__name__}: {err}); the model directory "
                          f"needs its tokenizer files (tokenizer.json / tokenizer_config.json)") from None


def _special_tokens(tokenizer) -> dict:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}


def shared_vocab_size(student_tokenizer, teacher_tokenizer, student_path: str, teacher_path: str,
                      teacher_key: str = "teacher") -> int:
    """The number of leading ids both tokenizers give the same tokens, or a ConfigError naming both paths
    (`teacher_key`: the teacher's place in the config, teacher or teachers.<name>)."""
    size = min(len(student_tokenizer), len(teacher_tokenizer))
    teacher_ids = teacher_tokenizer.get_vocab()
    differing = sorted((i, token) for token, i in student_tokenizer.get_vocab().items()
                       if i < size and teacher_ids.get(token) != i)
    problems = []
    if differing:
        problems.append(f"{len(differing)} of the first {size} token ids differ, e.g. "
                        + ", ".join(f"id {i} {token!r} (teacher: id {teacher_ids.get(token)})"
                                    for i, token in differing[:SHOWN]))
    student_special, teacher_special = _special_tokens(student_tokenizer), _special_tokens(teacher_tokenizer)
    if student_special != teacher_special:
        problems.append(f"special tokens differ: student {student_special}, teacher {teacher_special}")
    if problems:
        raise ConfigError(f"student.path={student_path} and {teacher_key}.path={teacher_path} do not share a "
                          f"tokenizer: {'; '.join(problems)}. On-policy distillation compares their distributions "
                          f"token by token: use a teacher with the student's tokenizer, or set "
                          f"{teacher_key}.tokenizer=cross (aligned by text; auto: whichever fits)")
    return size


def tokenizer_mode(teacher, key: str, student_tokenizer, teacher_tokenizer, student_path: str) -> str:
    """teacher.tokenizer resolved: same (ids compared directly: the check above, its error when it fails) or
    cross (aligned by text); auto is same where the check passes."""
    if teacher.tokenizer == "cross":
        return "cross"
    try:
        shared_vocab_size(student_tokenizer, teacher_tokenizer, student_path, teacher.path, key)
        return "same"
    except ConfigError:
        if teacher.tokenizer == "same":
            raise
        return "cross"
