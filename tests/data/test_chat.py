import pytest

from megatron_opd.data.chat import encode_prompt, prompt_lengths, render_prompt, render_prompts
from megatron_opd.demo.tiny import train_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def plain_tokenizer():
    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_chat_template_ends_with_the_generation_prompt(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_ids_match_transformers_tokenize_path(tiny_tokenizer):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    expected = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = encode_prompt(tiny_tokenizer, MESSAGES)
    assert ids == list(expected)
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_without_a_template_the_contents_are_joined(plain_tokenizer):
    assert render_prompt(plain_tokenizer, MESSAGES) == "Be brief.\nWhat is 12 + 7?"
    assert plain_tokenizer.decode(encode_prompt(plain_tokenizer, MESSAGES)) == "Be brief.\nWhat is 12 + 7?"


@pytest.mark.parametrize("templated", [True, False])
def test_batch_paths_agree_with_single_paths(tiny_tokenizer, plain_tokenizer, templated):
    tokenizer = tiny_tokenizer if templated else plain_tokenizer
    conversations = [MESSAGES, MESSAGES[1:], [{"role": "user", "content": "the quick brown fox " * 9}]]
    texts = render_prompts(tokenizer, conversations)
    assert texts == [render_prompt(tokenizer, c) for c in conversations]
    assert prompt_lengths(tokenizer, texts) == [len(encode_prompt(tokenizer, c)) for c in conversations]
