"""Chat messages -> prompt text -> token ids, the way the rollout engine will see them."""
from typing import Sequence


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The chat-templated prompt ending with the assistant's generation prompt; without a template (base
    models), the message contents joined by newlines."""
    if has_chat_template(tokenizer):
        # tokenize=False: transformers 5 returns a BatchEncoding for tokenize=True, and the text is also what
        # the length filter batches through the fast tokenizer.
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "\n".join(message["content"] for message in messages)


def render_prompts(tokenizer, conversations: Sequence[Sequence[dict]]) -> list:
    """`render_prompt` for many conversations at once (one template compilation, one call)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([list(c) for c in conversations], add_generation_prompt=True,
                                             tokenize=False)
    return [render_prompt(tokenizer, c) for c in conversations]


def encode_kwargs(tokenizer) -> dict:
    # A chat template writes its own special tokens (BOS included where the model wants one); plain text
    # gets the tokenizer's own, as in pretraining.
    return {"add_special_tokens": not has_chat_template(tokenizer)}


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list:
    return tokenizer.encode(render_prompt(tokenizer, messages), **encode_kwargs(tokenizer))


def prompt_lengths(tokenizer, texts: Sequence[str]) -> list:
    """Token counts of rendered prompts, through the tokenizer's batch path (ids only: the masks it would
    also build by default double the time)."""
    encoded = tokenizer(list(texts), return_attention_mask=False, return_token_type_ids=False,
                        **encode_kwargs(tokenizer))
    return [len(ids) for ids in encoded["input_ids"]]
