"""Cross-tokenizer alignment: a teacher whose tokenizer is not the student's scores the student's responses as
its own tokenizer writes them (retokenize.py), its values moved onto the student's tokens span by span
(align.py); the tokens the two vocabularies share (shared.py) carry the full-distribution divergences."""
from megatron_opd.data.xtok.align import AlignStats, Span, align, span_index, span_shares, span_values
from megatron_opd.data.xtok.byte_vocab import ByteVocab
from megatron_opd.data.xtok.retokenize import CrossResponse, teacher_response
from megatron_opd.data.xtok.shared import SharedVocab

__all__ = ["AlignStats", "ByteVocab", "CrossResponse", "SharedVocab", "Span", "align", "span_index", "span_shares",
           "span_values", "teacher_response"]
