"""Multi-turn rollouts: the student and an environment take turns (rollout.env), each conversation kept as
token ids from first to last. The engine continues the ids it was given (SGLang's prefix cache finds them;
the embedded engine re-fills them), the assistant tokens are the ones it sampled, never re-tokenised, and the
environment's messages enter as the chat template renders them (chat_turns.py), with no loss but in the
context the teacher scores.

A conversation ends when the environment says done (its reward is the conversation's), after
rollout.max_turns assistant turns, when its tokens after the prompt reach the limit (rollout.response_length;
a turn cut there is the last; a turn cut at rollout.max_turn_tokens is closed and answered), when the engine
stops on another stop token than the template's turn end (no turn can follow it), or when the environment
fails (guard.py): then a message names the row, the conversation keeps what it has and the step goes on."""
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.engine import RolloutEngine, SamplingParams
from megatron_opd.rollout.envs.base import Environment
from megatron_opd.rollout.envs.factory import make_env_factory
from megatron_opd.rollout.envs.guard import EnvFailure, env_start, env_turn

@dataclass
class Conversation:
    prompt_ids: list[int]  # the first messages and the generation prompt
    response_ids: list[int] = field(default_factory=list)  # every token after the prompt
    loss_mask: list[float] = field(default_factory=list)  # 1 on an assistant token, 0 on the environment's
    logprobs: list[float] = field(default_factory=list)  # the engine's, per assistant token; 0 at the others
    messages: list[dict] = field(default_factory=list)  # the first messages (data for opd-generate)
    segments: list[tuple[bool, int]] = field(default_factory=list)  # (assistant's?, token count) in order
    turns: int = 0
    reward: float = 0.0
    ending: str = ""  # done | max_turns | length (these two: truncated) | stopped | env_error
    error: Optional[str] = None
    sent_tokens: int = 0  # the ids sent to the engine, over the turns
    cached_tokens: int = 0  # of those, the ones the engine found in its prefix cache

    @property
    def truncated(self) -> bool:
        return self.ending in ("length", "max_turns")

    def _append(self, ids: list[int], assistant: bool, logprobs: Optional[list[float]] = None) -> None:
        self.response_ids += ids
        self.loss_mask += [1.0 if assistant else 0.0] * len(ids)
        self.logprobs += logprobs if assistant else [0.0] * len(ids)
        self.segments.append((assistant, len(ids)))


@dataclass(frozen=True)
class ConversationLimits:
    max_turns: int
    max_tokens: int  # after the prompt, the environment's included
    max_turn_tokens: Optional[int] = None  # a turn's; None: what is left of max_tokens
    env_timeout_s: float = 30.0


def turn_seed(seed: Optional[int], turn: int) -> Optional[int]:
    return None if seed is None else seed * 1_009 + turn


def roll_out(engine: RolloutEngine, chat: ChatTurns, new_env: Callable[[], Environment], rows: list[dict],
             row_indices: list[int], fallback_prompts: list[list[int]], sampling: SamplingParams,
             limits: ConversationLimits) -> list[Conversation]:
    """`sampling.n` conversations per row (verl-schema dicts), grouped by row like Engine.generate's samples.
    A conversation whose environment fails to start keeps the row's own prompt (`fallback_prompts`) and
    has no response."""
    conversations, envs = [], []
    for row, index, fallback in zip(rows, row_indices, fallback_prompts):
        for _ in range(sampling.n):
            env = new_env()
            messages = env_start(env, row, index, limits.env_timeout_s)
            if isinstance(messages, EnvFailure):
                conversations.append(_failed(Conversation(list(fallback)), messages))
            else:
                conversations.append(Conversation(chat.prompt_ids(messages), messages=messages))
            envs.append((env, index))
    turn = 0
    while True:
        active = [k for k, c in enumerate(conversations) if not c.ending]
        if not active:
            return conversations
        left = {k: limits.max_tokens - len(conversations[k].response_ids) for k in active}
        sent = [conversations[k].prompt_ids + conversations[k].response_ids for k in active]
        samples = engine.generate(sent,
                                  dataclasses.replace(sampling, n=1, max_new_tokens=_turn_budget(left, limits),
                                                      seed=turn_seed(sampling.seed, turn)))
        for k, ids, sample in zip(active, sent, samples):
            conversations[k].sent_tokens += len(ids)
            _take_turn(conversations[k], sample, left[k], chat, *envs[k], limits)
        turn += 1


def _turn_budget(left: dict, limits: ConversationLimits) -> int:
    longest = max(left.values())
    return longest if limits.max_turn_tokens is None else min(longest, limits.max_turn_tokens)


def _take_turn(conversation: Conversation, sample, left: int, chat: ChatTurns, env: Environment, index: int,
               limits: ConversationLimits) -> None:
    # Every conversation of a turn is sampled to the longest budget among them; each keeps its own.
    ids = sample.response_ids[:left]
    conversation._append(ids, True, sample.logprobs[:left])
    conversation.turns += 1
    conversation.cached_tokens += sample.cached_tokens
    # A turn cut at max_turn_tokens is closed by the template's stop token (not sampled: no loss) and answered;
    # one cut at the conversation's limit ends it.
    closing = [] if ids and ids[-1] == chat.stop_id else [chat.stop_id]
    if closing and sample.finish_reason == "stop" and len(ids) == len(sample.response_ids):
        conversation.ending = "stopped"
        return
    if closing and not (len(ids) == limits.max_turn_tokens and len(ids) < left):
        conversation.ending = "length"
        return
    observation = env_turn(env, chat.tokenizer.decode(ids, skip_special_tokens=True), index, limits.env_timeout_s)
    if isinstance(observation, EnvFailure):
        _failed(conversation, observation)
        return
    if observation.done:
        conversation.ending, conversation.reward = "done", float(observation.reward)
        return
    if conversation.turns == limits.max_turns:
        conversation.ending = "max_turns"
        return
    following = closing + chat.observation_ids(observation.messages)
    if len(conversation.response_ids) + len(following) >= limits.max_tokens:  # no room for an assistant token
        conversation.ending = "length"
        return
    conversation._append(following, False)


def _failed(conversation: Conversation, failure: EnvFailure) -> Conversation:
    conversation.ending, conversation.error = "env_error", failure.message
    print(f"rollout.env: {failure.message}; that conversation ends here, the step goes on", file=sys.stderr,
          flush=True)
    return conversation


def conversation_metrics(conversations: list[Conversation]) -> dict:
    """rollout/turns_mean, env_tokens_share (of the tokens after the prompts), env_errors (a count),
    truncated_share, and prefix_cached_share: of the ids sent to the engine over all turns, the share its prefix
    cache held (SGLang's cached_tokens; the embedded engine re-fills: 0)."""
    count = len(conversations)
    tokens = sum(len(c.response_ids) for c in conversations)
    env_tokens = sum(len(c.loss_mask) - sum(c.loss_mask) for c in conversations)
    sent = sum(c.sent_tokens for c in conversations)
    return {"rollout/turns_mean": sum(c.turns for c in conversations) / count,
            "rollout/env_tokens_share": env_tokens / tokens if tokens else 0.0,
            "rollout/env_errors": float(sum(c.ending == "env_error" for c in conversations)),
            "rollout/truncated_share": sum(c.truncated for c in conversations) / count,
            "rollout/prefix_cached_share": sum(c.cached_tokens for c in conversations) / sent if sent else 0.0}


def env_row(item: dict) -> dict:
    """A prompt dataset item (data/prompt_dataset.py) as the verl-schema row an Environment starts from."""
    return {"data_source": item["data_source"], "prompt": item["raw_prompt"],
            "reward_model": {"ground_truth": item["ground_truth"]}, "extra_info": {"index": item["index"]}}


@dataclass(frozen=True)
class MultiTurn:
    """A run's conversations: rollout.env's environments, their limits, and the chat template's pieces."""
    chat: ChatTurns
    new_env: Callable[[], Environment]
    limits: ConversationLimits

    @classmethod
    def of(cls, rollout, tokenizer) -> Optional["MultiTurn"]:
        """From the rollout config (rollout.env, max_turns, response_length, env_timeout_s); None without env.
        The template advertises the environment class's tools."""
        if rollout.env is None:
            return None
        new_env = make_env_factory(rollout.env)
        return cls(ChatTurns(tokenizer, new_env.tools), new_env,
                   ConversationLimits(rollout.max_turns, rollout.response_length, rollout.max_turn_tokens,
                                      rollout.env_timeout_s))

    def roll_out(self, engine: RolloutEngine, items: list[dict], sampling: SamplingParams) -> list[Conversation]:
        return roll_out(engine, self.chat, self.new_env, [env_row(item) for item in items],
                        [item["index"] for item in items], [item["input_ids"] for item in items], sampling,
                        self.limits)


def as_text(conversation: Conversation, tokenizer) -> tuple[str, list[list[int]]]:
    """The tokens after the prompt as text (special tokens written out, the final stop token left off: a
    given response gets the eos appended when it is read for training) and the [start, end) character spans
    of the environment's tokens (data.response_skip_key trains without them)."""
    ids = list(conversation.response_ids)
    segments = list(conversation.segments)
    if ids and ids[-1] == tokenizer.eos_token_id and segments and segments[-1][0]:
        ids.pop()
        segments[-1] = (True, segments[-1][1] - 1)
    text, spans, at = "", [], 0
    for assistant, count in segments:
        piece = tokenizer.decode(ids[at:at + count], skip_special_tokens=False)
        if not assistant:
            spans.append([len(text), len(text) + len(piece)])
        text, at = text + piece, at + count
    return text, spans
