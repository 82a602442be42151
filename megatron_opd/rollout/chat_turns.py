"""The chat template's pieces as token ids, for a conversation kept as ids from first to last: the prompt
(the first messages and the generation prompt), and what follows an assistant turn the engine ended with its
stop token (the environment's messages and the next generation prompt).

An observation's ids are the difference of two renderings of a probe conversation, one that ends with an
assistant turn and one that goes on with the observation: so they are exactly what the template writes there,
and the assistant's own tokens are never re-tokenised. A template that does not end an assistant turn with
the tokenizer's end-of-sequence token (the engine's stop token) cannot be continued this way and is refused."""
from typing import Sequence

_PROBE = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "probe"}]


class ChatTurnsError(ValueError):
    """A tokenizer whose chat template a conversation cannot be continued on; the message says why."""


class ChatTurns:
    def __init__(self, tokenizer, tools: Sequence[dict] = ()):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ChatTurnsError("rollout.env needs a tokenizer with a chat template (the environment's messages are "
                                 "rendered with it); this one has none")
        self.tokenizer, self.tools = tokenizer, list(tools) or None
        self.stop_id = tokenizer.eos_token_id
        ended = self._ids(_PROBE, generation=False)
        ends = [i for i, token in enumerate(ended) if token == self.stop_id]
        if not ends:
            raise ChatTurnsError(f"the chat template does not end an assistant turn with the tokenizer's eos token "
                                 f"{tokenizer.eos_token!r}, where the engine stops: a conversation cannot go on "
                                 f"after it")
        self._turn_end = ended[:ends[-1] + 1]  # the probe up to its assistant turn's stop token

    def _ids(self, messages: list[dict], generation: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=generation,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation's first messages and the generation prompt."""
        return self._ids(list(messages), generation=True)

    def observation_ids(self, messages: list[dict]) -> list[int]:
        """What the template writes after an assistant turn's stop token: the rest of that turn's closing, the
        `messages` and the next generation prompt."""
        full = self._ids(_PROBE + list(messages), generation=True)
        if full[:len(self._turn_end)] != self._turn_end:
            raise ChatTurnsError("the chat template renders an assistant turn differently when messages follow it; "
                                 "the conversation's ids cannot be continued")
        return full[len(self._turn_end):]
