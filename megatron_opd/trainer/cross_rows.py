"""A step's sequences as a teacher of another tokenizer reads them (teacher.tokenizer=cross), made on rank 0 with
the samples and broadcast with them: each sequence's teacher ids, and where the teacher's values go on the
student's tokens (data/xtok/). A teacher whose vocabulary is the student's numbered apart (the same strings)
reads the student's very ids, renumbered: it scores the segmentation the student sampled, as the same
tokenizer would; any other re-tokenises the text."""
from dataclasses import dataclass

from megatron_opd.config import ConfigError, run_teachers, teacher_key
from megatron_opd.data.chat import encode_kwargs, render_prompt
from megatron_opd.data.xtok import AlignStats, ByteVocab, SharedVocab, Span, span_index, span_shares, teacher_response


@dataclass
class CrossView:
    """One teacher's view of a step's sequences, per sequence."""
    pairs: list  # (teacher prompt ids, teacher response ids)
    teacher_at: list  # positions of the teacher's batch whose next-token values are its response tokens'
    student_at: list  # positions of the student's batch whose next-token values are its aligned response tokens'
    span_of_teacher: list  # per teacher response token, its span (numbered from 0 in the sequence)
    span_of_student: list  # per aligned student response token, its span
    shares: list  # per aligned student response token, its share of its span's teacher total
    aligned: list  # the student's response tokens with a teacher value (a tail past them has none: no loss)
    one_to_one: list  # (student token, teacher token) of each span of one token each: full kinds compare there


class CrossTokens:
    """Set up once per cross teacher: both vocabularies as bytes and what they share."""

    def __init__(self, student_tokenizer, teacher_tokenizer, student_path: str, teacher_path: str, key: str):
        try:
            self.student = ByteVocab.of(student_tokenizer, student_path)
            self.teacher = ByteVocab.of(teacher_tokenizer, teacher_path)
        except ValueError as err:
            raise ConfigError(f"{key}.tokenizer=cross: {err}") from None
        self.tokenizer = teacher_tokenizer
        self.student_end, self.teacher_end = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
        self.shared = SharedVocab.of(self.student, self.teacher, ((self.student_end, self.teacher_end),))
        self.renumbered = self.shared.is_permutation(len(self.teacher))

    def view(self, prompts: list, pairs: list, student_weights: list, own: list) -> tuple[CrossView, dict]:
        """`prompts`: per sequence its messages (raw_prompt); `pairs`: the student's (prompt ids, response ids);
        `student_weights`: per sequence the student's log-probs of its response tokens, or None (split evenly);
        `own`: per sequence whether this teacher scores it (the metrics count those). Returns the view and the
        step's xtok/* metrics."""
        view = CrossView([], [], [], [], [], [], [], [])
        tokens = aligned = one_to_one = split = 0
        for messages, (prompt, response), weights, counted in zip(prompts, pairs, student_weights, own):
            if self.renumbered:
                mapped = self.shared.student_to_teacher
                teacher_pair = ([mapped[t] for t in prompt], [mapped[t] for t in response])
                spans = [Span((k, k + 1), (k, k + 1)) for k in range(len(response))]
            else:
                cross = teacher_response(response, self.student, self.student.special, self.tokenizer, self.teacher,
                                         self.teacher_end, render_prompt(self.tokenizer, messages),
                                         encode_kwargs(self.tokenizer))
                teacher_pair, spans = (cross.teacher_prompt_ids, cross.teacher_response_ids), cross.spans
            of_teacher, of_student = span_index(spans)
            view.pairs.append(teacher_pair)
            view.teacher_at.append([len(teacher_pair[0]) + k - 1 for k in range(len(of_teacher))])
            view.student_at.append([len(prompt) + k - 1 for k in range(len(of_student))])
            view.span_of_teacher.append(of_teacher)
            view.span_of_student.append(of_student)
            view.shares.append(span_shares(spans, weights))
            view.aligned.append(len(of_student))
            view.one_to_one.append([(span.student[0], span.teacher[0]) for span in spans if span.one_to_one])
            if counted:
                stats = AlignStats.of(spans)
                tokens, aligned = tokens + len(response), aligned + len(of_student)
                one_to_one, split = one_to_one + stats.one_to_one, split + stats.split_boundary
        count = max(tokens, 1)  # of the student's response tokens: with a teacher value, in 1:1 spans, a share
        metrics = {"xtok/aligned_share": aligned / count, "xtok/one_to_one_share": one_to_one / count,
                   "xtok/split_boundary_share": split / count, "xtok/shared_vocab_share": self.shared.share}
        return view, metrics


def cross_tokens(cfg, student_tokenizer, announce: bool) -> dict:
    """name -> CrossTokens of each teacher whose teacher.tokenizer resolves to cross (after the config checks);
    `announce`: print which way each teacher's tokenizer went where it was not set to same."""
    from megatron_opd.trainer.vocab import load_tokenizer, tokenizer_mode

    if cfg.trainer.mode != "distill":
        return {}
    out = {}
    for name, teacher in run_teachers(cfg).items():
        key = teacher_key(cfg, name)
        teacher_tokenizer = load_tokenizer(teacher.path, f"{key}.path")
        mode = tokenizer_mode(teacher, key, student_tokenizer, teacher_tokenizer, cfg.student.path)
        if mode == "cross":
            out[name] = CrossTokens(student_tokenizer, teacher_tokenizer, cfg.student.path, teacher.path, key)
        if announce and teacher.tokenizer != "same":
            detail = (f", {out[name].shared.share:.1%} of the student's vocabulary shared"
                      + (", the same strings numbered apart: ids renumbered" if out[name].renumbered else "")
                      if mode == "cross" else "")
            print(f"{key}.tokenizer={teacher.tokenizer}: {mode}{detail}", flush=True)
    return out
