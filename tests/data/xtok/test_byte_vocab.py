"""Tokens as the bytes they write, for byte-level and SentencePiece-style vocabularies, and the tokens two
vocabularies share."""
import pytest

from megatron_opd.data.xtok.byte_vocab import ByteVocab, byte_alphabet
from megatron_opd.data.xtok.shared import SharedVocab
from megatron_opd.demo.tiny import train_tokenizer

TEXTS = ["the quick brown fox", "héllo wörld\n12 + 30 = 42 #### 42", "  two spaces, ü and 日本"]


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind=kind) for kind in ("byte_level", "metaspace")}


def test_the_byte_alphabet_draws_every_byte_once():
    alphabet = byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["a"] == ord("a")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_the_bytes_of_an_encoding_are_its_text(tokenizers, kind):
    tokenizer = tokenizers[kind]
    vocab = ByteVocab.of(tokenizer)
    assert vocab.kind == kind and vocab.prefix_space == (kind == "metaspace")
    for text in TEXTS:
        written = b"".join(vocab.text_bytes(tokenizer.encode(text, add_special_tokens=False)))
        # a SentencePiece-style tokenizer writes a space before the first word (its dummy prefix)
        assert written == (b" " if kind == "metaspace" and not text.startswith(" ") else b"") + text.encode()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in vocab.special and vocab.text_bytes([end]) == [b""] and vocab.pieces[end] == b"<|im_end|>"


def test_shared_tokens_match_by_bytes_across_kinds(tokenizers):
    byte_level, metaspace = (ByteVocab.of(tokenizers[k]) for k in ("byte_level", "metaspace"))
    shared = SharedVocab.of(byte_level, metaspace)
    the = tokenizers["byte_level"].convert_tokens_to_ids("Ġthe")
    assert shared.student_to_teacher[the] == tokenizers["metaspace"].convert_tokens_to_ids("▁the")  # ' the' 
    # a byte: the byte-level token of 'é''s first byte is the metaspace vocabulary's '<0xC3>'
    first = tokenizers["byte_level"].convert_tokens_to_ids("Ã")
    assert shared.student_to_teacher[first] == tokenizers["metaspace"].convert_tokens_to_ids("<0xC3>")
    assert 0 < shared.share < 1 and not shared.is_permutation(len(metaspace))
    assert SharedVocab.of(byte_level, byte_level).is_permutation(len(byte_level))
