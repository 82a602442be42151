"""A student's response as the teacher's tokenizer writes it: the student's sampled ids turned into their bytes
(never decoded and re-encoded on the student's side: a sampled segmentation need not be the one its tokenizer
would choose), the text encoded by the teacher after the teacher's own rendering of the prompt, and the two
tokenisations aligned (align.py). The student's end-of-turn token is matched by role to the teacher's."""
from dataclasses import dataclass
from typing import Sequence

from megatron_opd.data.xtok.align import AlignStats, Span, align
from megatron_opd.data.xtok.byte_vocab import ByteVocab


@dataclass(frozen=True)
class CrossResponse:
    teacher_prompt_ids: list  # the teacher's rendering of the prompt
    teacher_response_ids: list  # the response's text as the teacher tokenises it after that prompt, end included
    spans: list  # Span over response positions of both; the end tokens form the last, 1:1

    @property
    def aligned(self) -> int:
        """The student's response tokens the spans cover; a tail past them (a character left unfinished) has
        no teacher counterpart."""
        return self.spans[-1].student[1] if self.spans else 0

    @property
    def stats(self) -> AlignStats:
        return AlignStats.of(self.spans)


def teacher_response(student_ids: Sequence[int], student: ByteVocab, student_ends: Sequence[int],
                     teacher_tokenizer, teacher: ByteVocab, teacher_end: int, teacher_prompt_text: str,
                     encode_kwargs: dict) -> CrossResponse:
    """`student_ids`: a sampled response (its end token, one of `student_ends`, last if it ended). Aligned up to
    the first token no other tokenizer can write: a special token inside the response (only the end of the
    turn is matched, by role), or a character left unfinished."""
    ids = list(student_ids)
    ended = bool(ids) and ids[-1] in student_ends
    body = ids[:-1] if ended else ids
    inside = next((k for k, i in enumerate(body) if i in student.special), len(body))
    pieces = student.text_bytes(body[:inside])
    aligned = _complete_characters(pieces)
    text = b"".join(pieces[:aligned]).decode()
    prompt_ids = teacher_tokenizer.encode(teacher_prompt_text, **encode_kwargs)
    full = teacher_tokenizer.encode(teacher_prompt_text + text, **encode_kwargs)
    # As the teacher would read the whole text, unless its first response token merges with the prompt's end:
    # then the response alone, where a SentencePiece-style tokenizer writes its dummy space before it.
    joined = full[:len(prompt_ids)] == prompt_ids
    response_ids = full[len(prompt_ids):] if joined else teacher_tokenizer.encode(text, add_special_tokens=False)
    spans = _aligned_spans(pieces[:aligned], teacher, response_ids, text) if aligned else []
    if ended and aligned == len(body):
        spans.append(Span((aligned, aligned + 1), (len(response_ids), len(response_ids) + 1)))
        response_ids = [*response_ids, teacher_end]
    return CrossResponse(prompt_ids, response_ids, spans)


def _aligned_spans(student_pieces: list, teacher: ByteVocab, response_ids: list, text: str) -> list:
    teacher_pieces = teacher.text_bytes(response_ids)
    lead = 0
    if teacher.prefix_space and b"".join(teacher_pieces) == b" " + text.encode():
        teacher_pieces[0] = teacher_pieces[0][1:]  # the dummy space: the first word's, not the text's
        lead = 0 if teacher_pieces[0] else 1  # a lone '▁' joins the first span
    spans = align(student_pieces, teacher_pieces[lead:])
    if lead:
        spans = [Span(s.student, (s.teacher[0] + (1 if k else 0), s.teacher[1] + 1)) for k, s in enumerate(spans)]
    return spans


def _complete_characters(pieces: Sequence[bytes]) -> int:
    """How many leading tokens write whole UTF-8 characters: from the token holding the first byte that is not
    part of one (a response cut inside a character, a byte-level token sampled out of place) no other tokenizer
    can write the rest."""
    try:
        b"".join(pieces).decode()
        return len(pieces)
    except UnicodeDecodeError as err:
        bad = err.start
    end = 0
    for count, piece in enumerate(pieces):
        end += len(piece)
        if end > bad:
            return count
    return len(pieces)
