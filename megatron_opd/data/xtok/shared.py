"""The tokens two vocabularies share: the same bytes under both ('Ġthe' of a byte-level vocabulary is '▁the'
of a SentencePiece one: ' the'), found once from the tokenizers. Over them a divergence between the two
models' next-token distributions is exact; the rest of each vocabulary has no counterpart."""
from dataclasses import dataclass

import torch

from megatron_opd.data.xtok.byte_vocab import ByteVocab


@dataclass(frozen=True)
class SharedVocab:
    student_to_teacher: tuple  # student id -> teacher id with the same bytes, or -1
    shared: int  # student ids with a counterpart

    @classmethod
    def of(cls, student: ByteVocab, teacher: ByteVocab, end_pairs: tuple = ()) -> "SharedVocab":
        """Special tokens match a special token of the same content; `end_pairs`, (student id, teacher id),
        match others by role (the end of a turn: '<|im_end|>' and '<|eot_id|>')."""
        by_bytes = {}
        for index, piece in enumerate(teacher.pieces):
            if piece:
                # several ids for one string ('A' and its byte fallback '<0x41>'): the one the tokenizer writes,
                # the first listed (merged and plain pieces precede fallbacks in every vocabulary read here)
                by_bytes.setdefault((index in teacher.special, piece), index)
        mapping = [-1] * len(student.pieces)
        for index, piece in enumerate(student.pieces):
            if piece:
                mapping[index] = by_bytes.get((index in student.special, piece), -1)
        for student_id, teacher_id in end_pairs:
            mapping[student_id] = teacher_id
        return cls(tuple(mapping), sum(m >= 0 for m in mapping))

    @property
    def share(self) -> float:
        """Of the student's vocabulary, the ids with a counterpart (metric xtok/shared_vocab_share)."""
        return self.shared / len(self.student_to_teacher)

    def unshared_teacher(self, teacher_size: int):
        """[teacher_size] bool tensor: the teacher ids no student id has the string of (the rest of its vocabulary)."""
        out = torch.ones(teacher_size, dtype=torch.bool)
        out[[m for m in self.student_to_teacher if 0 <= m < teacher_size]] = False
        return out

    def is_permutation(self, teacher_size: int) -> bool:
        """Every id on both sides has exactly one counterpart: the vocabularies are one, numbered apart."""
        targets = [m for m in self.student_to_teacher if m >= 0]
        return self.shared == len(self.student_to_teacher) == teacher_size and len(set(targets)) == len(targets)
