"""Teachers of another tokenizer for the cross-tokenizer tests: the same model and tokenizer with every id
renumbered (a permutation: the same strings, other ids, the embedding and output rows moved with them), and a
tiny Llama with a SentencePiece-style tokenizer of its own."""
import json
import os
import random

import torch

from megatron_opd.demo.tiny import CHAT_TEMPLATE, write_tiny_checkpoint, train_tokenizer


def permuted_tokenizer(tokenizer, permutation: list):
    """`tokenizer` (a fast one) with id i renumbered permutation[i]."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    described = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = described["model"]["vocab"]
    for piece in vocab:
        vocab[piece] = permutation[vocab[piece]]
    for added in described["added_tokens"]:
        added["id"] = permutation[added["id"]]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(described)),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, bos_token=None,
                                   unk_token=None)
    fast.chat_template = tokenizer.chat_template
    return fast


@torch.no_grad()
def permuted_checkpoint(src: str, out: str, seed: int = 0) -> str:
    """The HF checkpoint at `src` with its tokenizer's ids renumbered by a random permutation (rows past the
    tokenizer, padding, stay); the same model on other ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    permutation = list(range(len(tokenizer)))
    random.Random(seed).shuffle(permutation)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    order = torch.tensor(permutation)
    for weight in {id(w): w for w in (model.get_input_embeddings().weight,
                                      model.get_output_embeddings().weight)}.values():
        rows = weight[:len(permutation)].clone()
        weight[order] = rows
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            setattr(model.config, key, permutation[value])
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    permuted_tokenizer(tokenizer, permutation).save_pretrained(out)
    return out


def sentencepiece_llama(out: str, seed: int = 3, **overrides) -> str:
    """A tiny Llama whose tokenizer is SentencePiece-style ('▁' spaces, byte fallbacks), with ChatML."""
    tokenizer = train_tokenizer(kind="metaspace")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    return write_tiny_checkpoint(out, "llama", seed=seed, tokenizer=tokenizer, **overrides)
