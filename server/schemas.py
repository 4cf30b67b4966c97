"""Request bodies: OpenAI chat completions and the grouped-completion API.

Responses are plain dicts built in server/chat.py and server/grouped.py. Unions such as
"a string or a list of text parts" are normalised by `before` validators, so a validation error
names a plain field path (`messages[0].content`), never a union branch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
)

from model.engine.interface import SEED_RANGE
from server.router_defaults import RouterDefaults

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TEXT_CHARS = 2_000_000
MAX_QUESTIONS = 256
MAX_ID_CHARS = 256


def _json_number(value):
    """A JSON number: never a string or a boolean coerced into one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]


def _stop_list(value):
    """`stop` may be a string, a list of strings or null; always a list afterwards."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": accepted, not used

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value):
        """OpenAI's list-of-parts form: only text parts can be served."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError('must be a string or a list of text parts ({"type": "text", '
                             '"text": "..."})')
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)

    def as_template_message(self) -> dict:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class ChatCompletionRequest(RouterDefaults):
    # an unknown field is an error naming it: nothing a client asks for is silently dropped
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=MAX_ID_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # an extension, as in vLLM: 0 or None: off
    ignore_eos: StrictBool | None = None  # an extension, as in vLLM: write until max_tokens
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    # accepted only at their neutral values: anything else would be silently ignored
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, float] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = 1
    logprobs: StrictBool | None = None
    tools: list | None = None
    # OpenAI fields that do not change what is generated: accepted, not used
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    group_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)

    _normalise_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("n")
    @classmethod
    def only_one_choice(cls, value):
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def no_penalty(cls, value):
        if value:
            raise ValueError("only 0, the neutral value, is supported (no penalties)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def no_logit_bias(cls, value):
        if value:
            raise ValueError("only {}, the neutral value, is supported (no biases)")
        return value

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def no_tools(cls, value):
        if value is not None:  # even an empty list: a client that sends tools expects them
            raise ValueError("tools are not supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def includes_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class GroupedQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class GroupedCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # our own API: a misspelt field is an error

    model: str | None = Field(None, max_length=MAX_ID_CHARS)
    context: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    questions: list[GroupedQuestion] = Field(min_length=1, max_length=MAX_QUESTIONS)
    system_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    max_tokens: StrictInt = Field(96, ge=1)  # the research protocol's budget
    temperature: Number = Field(0.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: StrictBool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)

    _normalise_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("questions", mode="before")
    @classmethod
    def wrap_plain_questions(cls, value):
        if isinstance(value, list):
            return [{"question": q} if isinstance(q, str) else q for q in value]
        return value

    @field_validator("questions")
    @classmethod
    def unique_ids(cls, value):
        """Answers are told apart by id: a question without one is known by its index."""
        ids = [q.id if q.id is not None else str(i) for i, q in enumerate(value)]
        if len(ids) != len(set(ids)):
            raise ValueError("question ids must be unique (a question without an id is "
                             "known by its index as a string)")
        return value

    def question_id(self, index: int) -> str:
        """The caller's id, or the question's index as a string."""
        given = self.questions[index].id
        return given if given is not None else str(index)
