"""Every token of a tokenizer as the bytes it stands for, so that two tokenizers can be compared by what they
write: byte-level BPE (GPT-2, Qwen, Llama 3: each byte drawn as a printable character) and SentencePiece-style
vocabularies (Llama 2, Mistral, Gemma: '▁' for a space, '<0xNN>' byte fallbacks). Added tokens are their
content ('<|im_end|>' is those ten bytes); special tokens are marked, since their text is not written text.
Read from the tokenizer's own description (its normaliser, pre-tokenizer and decoder), checked once by
decoding: a vocabulary this cannot read is refused, naming the tokenizer."""
import json
from dataclasses import dataclass


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable character for each byte, inverted: the 188 printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            shown[chr(byte)] = byte
        else:
            shown[chr(256 + extra)] = byte
            extra += 1
    return shown


_BYTE_LEVEL = byte_alphabet()


@dataclass(frozen=True)
class ByteVocab:
    name: str  # the tokenizer's path or name, for messages
    kind: str  # byte_level | metaspace
    pieces: tuple  # id -> bytes (None: an id no string maps to)
    special: frozenset  # ids of special tokens (eos, pad, ...): not written text
    prefix_space: bool  # a metaspace tokenizer writes '▁' before a text's first word

    @classmethod
    def of(cls, tokenizer, name: str = "") -> "ByteVocab":
        name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {name}: no fast (tokenizers) backend, so its pieces cannot be read as "
                             f"bytes; save it with a tokenizer.json")
        described = json.loads(backend.to_str())
        kind = _kind(described, name)
        added = {t["id"]: t for t in described.get("added_tokens", [])}
        vocab = tokenizer.get_vocab()
        pieces = [None] * (max(vocab.values()) + 1)
        for piece, index in vocab.items():
            if index in added:
                pieces[index] = added[index]["content"].encode()
            else:
                pieces[index] = _bytes_of(piece, kind, name)
        special = frozenset(index for index, token in added.items() if token.get("special"))
        prefix_space = kind == "metaspace" and _prepends_space(described)
        return cls(name, kind, tuple(pieces), special, prefix_space)

    def __len__(self) -> int:
        return len(self.pieces)

    def text_bytes(self, ids) -> list[bytes]:
        """The bytes of each id (special tokens and unknown ids: b"")."""
        return [b"" if i in self.special or i >= len(self.pieces) or self.pieces[i] is None else self.pieces[i]
                for i in ids]


def _kind(described: dict, name: str) -> str:
    decoders = _flatten(described.get("decoder"))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return "byte_level"
    spaces = any(d.get("type") == "Metaspace" or (d.get("type") == "Replace" and _pattern(d) == "▁")
                 for d in decoders)
    if spaces:
        return "metaspace"
    raise ValueError(f"tokenizer {name}: its decoder ({sorted(t for t in types if t)}) is neither byte-level nor "
                     f"SentencePiece-style ('▁' spaces), so its tokens cannot be aligned with another "
                     f"tokenizer's by their bytes; use teacher.tokenizer=same with a teacher of the student's "
                     f"tokenizer")


def _flatten(component) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("decoders") or component.get("pretokenizers") or component.get("normalizers") or []
        return [d for c in inner for d in _flatten(c)]
    return [component]


def _pattern(replace: dict):
    pattern = replace.get("pattern", {})
    return pattern.get("String") if isinstance(pattern, dict) else pattern


def _prepends_space(described: dict) -> bool:
    """Whether encoding a text puts '▁' (a space) before its first word: SentencePiece's dummy prefix, written
    by the pre-tokenizer (Metaspace, prepend_scheme first/always) or the normaliser (Prepend '▁')."""
    for part in _flatten(described.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in _flatten(described.get("normalizer")))


def _bytes_of(piece: str, kind: str, name: str) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(_BYTE_LEVEL[c] for c in piece)
        except KeyError as err:
            raise ValueError(f"tokenizer {name}: token {piece!r} has a character ({err}) outside the byte-level "
                             f"alphabet") from None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()
