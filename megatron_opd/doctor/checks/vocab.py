"""Check 1: can each teacher score the student's tokens? Shared ids (trainer/vocab.py), the rows each config
pads past its tokenizer, the special tokens, the chat templates, and the token ids of one real prompt of
data.train_files rendered by each tokenizer (the position of the first response token both sides score)."""
from megatron_opd.config import ConfigError, OPDConfig, run_teachers, teacher_key
from megatron_opd.data.chat import encode_prompt
from megatron_opd.data.sources import open_source
from megatron_opd.doctor.report import FAIL, OK, WARN, Finding, worst
from megatron_opd.models import load_arch
from megatron_opd.trainer.cross_rows import CrossTokens
from megatron_opd.trainer.vocab import load_tokenizer, shared_vocab_size, tokenizer_mode

CHECK = "vocab"
SPECIAL_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")


def first_prompt(cfg: OPDConfig) -> list:
    """The chat messages of the first row of data.train_files."""
    path = cfg.data.train_files[0]
    return open_source(path, cfg.data.prompt_key).row(0)["raw_prompt"]


def _model(path: str, key: str):
    """(tokenizer, config rows) of a model directory; raises naming `key`."""
    try:
        arch = load_arch(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}.path={path}: {err}") from None
    return load_tokenizer(path, f"{key}.path"), arch.vocab_size


def _padding(key: str, path: str, tokenizer, rows: int) -> tuple:
    """(status, text) on the rows `path`'s config has past its tokenizer's length."""
    if rows < len(tokenizer):
        return WARN, (f"{key}.path={path}: its config.json has {rows} vocabulary rows, fewer than its tokenizer's "
                      f"{len(tokenizer)} tokens; ids >= {rows} are never scored (check vocab_size in config.json)")
    return OK, f"{key}: {rows} rows, {rows - len(tokenizer)} padded past its {len(tokenizer)} tokens"


def _pair(cfg, student, prompt, name: str, teacher) -> Finding:
    key, s_path, t_path = teacher_key(cfg, name), cfg.student.path, teacher.path
    s_tok, s_rows = student
    try:
        t_tok, t_rows = _model(t_path, key)
        if tokenizer_mode(teacher, key, s_tok, t_tok, s_path) == "cross":
            return _cross(key, teacher, name, s_tok, t_tok, s_path)
        shared = shared_vocab_size(s_tok, t_tok, s_path, t_path, key)
    except ConfigError as err:
        return Finding(CHECK, FAIL, f"{key}.path: {err}", name)
    statuses, notes, problems = [], [], []
    for status, text in (_padding("student", s_path, s_tok, s_rows), _padding(key, t_path, t_tok, t_rows)):
        statuses.append(status)
        (notes if status == OK else problems).append(text)
    specials = {attr: (getattr(s_tok, attr), getattr(t_tok, attr)) for attr in SPECIAL_IDS}
    differing = {attr: ids for attr, ids in specials.items() if ids[0] != ids[1]}
    if differing:
        statuses.append(FAIL)
        problems.append(f"special token ids differ (student, teacher): {differing}; give {key}.path the student's "
                        f"special tokens (tokenizer_config.json / special_tokens_map.json)")
    if s_tok.chat_template != t_tok.chat_template:
        statuses.append(FAIL)
        problems.append(f"chat templates differ: student.path={s_path} and {key}.path={t_path} "
                        f"(tokenizer_config.json chat_template); teacher and student score the same templated "
                        f"prompt, so give the teacher the student's chat_template")
    else:
        s_ids, t_ids = encode_prompt(s_tok, prompt), encode_prompt(t_tok, prompt)
        if s_ids != t_ids:
            at = next((i for i, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
            statuses.append(FAIL)
            problems.append(f"the first prompt of {cfg.data.train_files[0]} tokenises differently: {len(s_ids)} ids "
                            f"(student) against {len(t_ids)} ({key}), first difference at position {at}; the teacher "
                            f"would score other tokens than the student's")
        else:
            notes.append(f"the first prompt of data.train_files is the same {len(s_ids)} ids on both sides (the "
                         f"first response token is predicted at position {len(s_ids) - 1})")
    vocab_size = min(shared, s_rows, t_rows)
    notes.insert(0, f"{shared} shared token ids, the divergence runs over {vocab_size}; special ids "
                    f"{ {attr: ids[0] for attr, ids in specials.items()} } equal")
    status = worst(statuses)
    message = "; ".join(problems) if status != OK else "; ".join(notes)
    return Finding(CHECK, status, message, name, {"shared_vocab_size": shared, "vocab_size": vocab_size,
                                                  "student_rows": s_rows, "teacher_rows": t_rows,
                                                  "student_tokens": len(s_tok), "teacher_tokens": len(t_tok)})


def check_vocab(cfg: OPDConfig) -> list:
    """One finding per teacher (details["vocab_size"]: the ids the divergence runs over, when they share a
    tokenizer). In SFT mode, the student's tokenizer alone."""
    try:
        student = _model(cfg.student.path, "student")
    except ConfigError as err:
        return [Finding(CHECK, FAIL, str(err))]
    if cfg.trainer.mode != "distill":
        return [Finding(CHECK, OK, f"trainer.mode={cfg.trainer.mode}: no teacher; the student's tokenizer loads "
                                   f"({len(student[0])} tokens)", details={"vocab_size": min(len(student[0]),
                                                                                             student[1])})]
    try:
        prompt = first_prompt(cfg)
    except (OSError, ValueError) as err:
        return [Finding(CHECK, FAIL, f"data.train_files: {err}")]
    return [_pair(cfg, student, prompt, name, teacher) for name, teacher in run_teachers(cfg).items()]


def vocab_size(findings: list):
    """The vocabulary the divergence runs over (the smallest over the teachers), or None when a pair fails."""
    sizes = [f.details.get("vocab_size") for f in findings]
    return None if not sizes or None in sizes or any(f.status == FAIL for f in findings) else min(sizes)



def _cross(key: str, teacher, name: str, s_tok, t_tok, s_path: str) -> Finding:
    """A teacher of another tokenizer (teacher.tokenizer cross, or auto on differing tokenizers): its responses
    are aligned by text, so what matters is that both vocabularies read as bytes, and how much they share."""
    cross = CrossTokens(s_tok, t_tok, s_path, teacher.path, key)  # ConfigError: a vocabulary it cannot read
    renumbered = "; the same strings numbered apart: the student's ids are renumbered" if cross.renumbered else ""
    return Finding(CHECK, OK, f"{key}.tokenizer={teacher.tokenizer}: cross, {cross.shared.share:.1%} of the "
                              f"student's vocabulary shared by bytes{renumbered}; responses are aligned by text "
                              f"(xtok/* metrics)", name,
                   {"tokenizer_mode": "cross", "shared_vocab_share": cross.shared.share,
                    "renumbered": cross.renumbered, "vocab_size": min(len(s_tok), load_arch(s_path).vocab_size)})
