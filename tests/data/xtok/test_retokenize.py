"""A student's sampled response as another tokenizer writes it after that tokenizer's own rendering of the
prompt, and the chain rule across the two: the teacher's log-probs moved onto the student's tokens sum to the
teacher's log-prob of the response text under its own tokenisation, whatever the segmentations."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_opd.data.chat import encode_kwargs, render_prompt
from megatron_opd.data.xtok.align import span_values
from megatron_opd.data.xtok.byte_vocab import ByteVocab, byte_alphabet
from megatron_opd.data.xtok.retokenize import teacher_response
from megatron_opd.demo.tiny import tiny_hf_config, train_tokenizer

MESSAGES = [{"role": "user", "content": "walk 3 4 -> 7 6"}]
TEXTS = ["walk 3 4 -> 7 6 : R45 U44", "the quick brown fox", "héllo wörld\n12 + 30 = 42", " 日本 #### 42"]
OTHER_CORPUS = ["teachers write their own way: quick, quicker, quickest", "30 + 12 = 42 and 42 - 12 = 30",
                "wörld of héllo"]


@pytest.fixture(scope="module")
def student():
    return train_tokenizer()


@pytest.fixture(scope="module", params=["fewer_merges", "other_corpus", "metaspace"])
def teacher(request):
    tokenizer = {"fewer_merges": lambda: train_tokenizer(vocab_size=270),
                 "other_corpus": lambda: train_tokenizer(OTHER_CORPUS, vocab_size=330),
                 "metaspace": lambda: train_tokenizer(kind="metaspace")}[request.param]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("llama", vocab_size=len(tokenizer))).eval()
    return tokenizer, model


def samples(tokenizer) -> list:
    """Each text as the tokenizer writes it, and as one sampling could: every token of a character past the
    first few as its single bytes (a segmentation the tokenizer would never choose), each ended with the eos."""
    byte_ids = {b: tokenizer.convert_tokens_to_ids(c) for c, b in byte_alphabet().items()}
    vocab, out = ByteVocab.of(tokenizer), []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(ids)
        out.append(ids[:2] + [byte_ids[b] for b in text.encode()[len(b"".join(vocab.text_bytes(ids[:2]))):]])
    return [ids + [tokenizer.eos_token_id] for ids in out]


@torch.no_grad()
def token_log_probs(model, prompt_ids, response_ids) -> list:
    ids = torch.tensor([prompt_ids + response_ids])
    logp = model(ids).logits[0].double().log_softmax(-1)
    return [logp[len(prompt_ids) + k - 1, token].item() for k, token in enumerate(response_ids)]


def test_the_student_values_sum_to_the_teachers_log_prob_of_the_text(student, teacher):
    teacher_tokenizer, model = teacher
    student_vocab, teacher_vocab = ByteVocab.of(student), ByteVocab.of(teacher_tokenizer)
    prompt_text = render_prompt(teacher_tokenizer, MESSAGES)
    for ids in samples(student):
        cross = teacher_response(ids, student_vocab, [student.eos_token_id], teacher_tokenizer, teacher_vocab,
                                 teacher_tokenizer.eos_token_id, prompt_text, encode_kwargs(teacher_tokenizer))
        assert cross.aligned == len(ids)
        # the reference: the text after the prompt as the teacher tokenises the whole, then its end of turn
        text = student.decode(ids[:-1])
        whole = teacher_tokenizer.encode(prompt_text + text, **encode_kwargs(teacher_tokenizer))
        reference_ids = whole[len(cross.teacher_prompt_ids):] + [teacher_tokenizer.eos_token_id]
        assert cross.teacher_response_ids == reference_ids
        reference = sum(token_log_probs(model, cross.teacher_prompt_ids, reference_ids))
        teacher_values = token_log_probs(model, cross.teacher_prompt_ids, cross.teacher_response_ids)
        for weights in (None, [-(k % 3) - 0.5 for k in range(len(ids))]):
            assert sum(span_values(cross.spans, teacher_values, weights)) == pytest.approx(reference, abs=1e-5)


def test_a_response_cut_inside_a_character_aligns_up_to_it(student):
    teacher_tokenizer = train_tokenizer(kind="metaspace")
    text_ids = student.encode("ab 日", add_special_tokens=False)
    byte_ids = {b: student.convert_tokens_to_ids(c) for c, b in byte_alphabet().items()}
    cut = student.encode("ab ", add_special_tokens=False) + [byte_ids["日".encode()[0]]]  # no end: the length ran out
    cross = teacher_response(cut, ByteVocab.of(student), [student.eos_token_id], teacher_tokenizer,
                             ByteVocab.of(teacher_tokenizer), teacher_tokenizer.eos_token_id, "", {})
    assert cross.aligned == len(cut) - 1 and len(text_ids) >= 2
    assert b"".join(ByteVocab.of(teacher_tokenizer).text_bytes(cross.teacher_response_ids)) == b" ab "


def test_a_special_token_inside_the_response_ends_what_is_aligned(student):
    text = student.encode("ab c", add_special_tokens=False)
    inside = text + [student.convert_tokens_to_ids("<|im_start|>")] + text + [student.eos_token_id]
    cross = teacher_response(inside, ByteVocab.of(student), [student.eos_token_id], student, ByteVocab.of(student),
                             student.eos_token_id, "", {"add_special_tokens": False})
    assert cross.aligned == len(text) and cross.teacher_response_ids == text  # no end token: the turn did not end
