"""The edge check: a request becomes the groups the grouping will run, each checked once against
the engine's frozen limits (`EngineInputError` -> 400 naming the field the client sent).

Prompts are tokenized off the event loop, in one hop per request; a grouped request's shared
system prompt and passage are tokenized once for all its questions. Text longer than any prompt
that fits the context could be is refused by its length first, without tokenizing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from model.engine.interface import EngineInputError, Member, SamplingParams
from server.prompts import question_messages
from server.schemas import ChatCompletionRequest, GroupedCompletionRequest
from server.services import ServedModel

DEFAULT_MAX_TOKENS = 256  # when a chat request sets neither max_tokens nor max_completion_tokens
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


async def chat_prompt(body: ChatCompletionRequest, model: ServedModel) -> list[int]:
    """The token ids of a chat request's prompt: its messages in the model's chat template."""
    messages = [message.as_template_message() for message in body.messages]
    _check_length(sum(len(m["content"]) for m in messages), model, "messages")
    return await asyncio.to_thread(model.prompts.chat, messages)


async def chat_member(body: ChatCompletionRequest, namespace: Hashable,
                      model: ServedModel) -> Member:
    """A chat request as the one member of its group."""
    prompt_ids = await chat_prompt(body, model)
    member = Member(prompt_ids, chat_params(body, len(prompt_ids), model), namespace=namespace)
    model.limits.check_group([member])
    return member


def chat_params(body: ChatCompletionRequest, prompt_length: int,
                model: ServedModel) -> SamplingParams:
    max_tokens = body.requested_max_tokens
    if max_tokens is None:  # a default must fit both the context and the whole KV cache
        room = min(model.limits.max_context, model.limits.kv_capacity) - prompt_length
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        ignore_eos=bool(body.ignore_eos),
        seed=body.seed,
        stop=tuple(body.stop),
    )


async def grouped_members(body: GroupedCompletionRequest, namespace: Hashable,
                          model: ServedModel, max_group_size: int) -> list[list[Member]]:
    """A grouped request's questions, in order, as groups of at most `max_group_size`."""
    texts = [q.question for q in body.questions]
    bare = sum(len(m["content"]) for m in question_messages(body.context, "",
                                                            body.system_prompt))
    _check_length(bare, model, "context", named=True)
    for index, text in enumerate(texts):
        _check_length(bare + len(text), model, f"questions[{index}].question", named=True)
    prompts = await asyncio.to_thread(model.prompts.questions, body.context, texts,
                                      body.system_prompt)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed, stop=tuple(body.stop))
    members = [Member(ids, params, namespace=namespace) for ids in prompts.prompts]
    for index, member in enumerate(members):
        try:
            model.limits.check_member(member)
        except EngineInputError as exc:
            raise _name_the_field(exc, index, prompts.bare_length, model) from None
    groups = [members[start : start + max_group_size]
              for start in range(0, len(members), max_group_size)]
    for group in groups:
        model.limits.check_room(group)
    return groups


def _name_the_field(error: EngineInputError, index: int, bare_length: int,
                    model: ServedModel) -> EngineInputError:
    """The engine speaks of a prompt; the client sent a context and questions. A prompt too
    long with any question is the context's fault; otherwise it is this question's."""
    if error.param != "messages":
        return EngineInputError(f"questions[{index}]: {error}", error.param)
    field = ("context" if bare_length >= model.limits.max_context
             else f"questions[{index}].question")
    return EngineInputError(f"{field}: {error}", field)


def _check_length(chars: int, model: ServedModel, param: str, named: bool = False) -> None:
    """Refuses text longer than any prompt that fits the context (every token is at most
    `max_token_chars` characters), before it is tokenized. `named`: the message starts with
    the field, as a grouped request's errors do."""
    limit = model.limits.max_context * model.prompts.max_token_chars
    if chars > limit:
        raise EngineInputError(
            f"{param + ': ' if named else ''}the prompt has {chars} characters; this model's "
            f"maximum context length is {model.limits.max_context} tokens, which hold at most "
            f"{limit} characters", param)
