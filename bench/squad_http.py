"""The two ways the SQuAD bench asks a server: the grouped endpoint and streaming chat.

httpx and the standard library only, so the bench runs against any OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from bench.squad import Question
from server.prompts import ANSWER_SYSTEM_PROMPT, question_messages


class ServerError(RuntimeError):
    """The server refused or broke a request; the message says which and why."""


@dataclass(frozen=True)
class RequestSettings:
    model: str | None
    max_tokens: int
    send_hints: bool = True  # chat mode: send `group_id`; off for servers that speak plain OpenAI


@dataclass(frozen=True)
class Reply:
    """One question's answer as the server sent it, with the client-side timings."""

    question_id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int  # billed: the whole prompt
    cached_tokens: int  # reused from a shared prefix; 0 when the server does not say
    completion_tokens: int
    latency_s: float  # request sent -> last byte received
    ttft_s: float | None = None  # request sent -> first text (streaming chat only)

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class RequestSlots:
    """Bounds the requests in flight. A group takes all its slots at once, so its requests
    really run together, and gives them back one by one as its answers arrive."""

    def __init__(self, limit: int):
        self.limit = limit
        self._in_use = 0
        self._changed = asyncio.Condition()

    async def acquire(self, count: int) -> None:
        if count > self.limit:
            raise ValueError(f"a group needs {count} requests, more than the limit {self.limit}")
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_use + count <= self.limit)
            self._in_use += count

    async def release(self) -> None:
        async with self._changed:
            self._in_use -= 1
            self._changed.notify_all()


# the untimed first request: on no passage, so no passage is in a prefix cache before its run
WARMUP_MESSAGES = [{"role": "user", "content": "Say hello."}]


async def warm_up(client: httpx.AsyncClient, model: str | None) -> None:
    """One short plain chat request on no passage, so first-request costs stay out of the
    figures. A server that refuses it ends the run with its message (a wrong key, say)."""
    body = {"model": model, "messages": WARMUP_MESSAGES, "max_tokens": 4, "temperature": 0.0}
    await _post_json(client, "/v1/chat/completions", body)


async def ask_grouped(
    client: httpx.AsyncClient, settings: RequestSettings, questions: list[Question],
    cache_salt: str,
) -> list[Reply]:
    """One POST /v1/grouped_completions for questions that share one context; `cache_salt`
    keeps the server's cached prefixes of other salts out of reach."""
    assert len({q.context for q in questions}) == 1, "a grouped request has one context"
    body = {
        "context": questions[0].context,
        "questions": [{"id": q.id, "question": q.question} for q in questions],
        "system_prompt": ANSWER_SYSTEM_PROMPT,
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
        "cache_salt": cache_salt,
    }
    if settings.model:
        body["model"] = settings.model
    started = time.perf_counter()
    payload = await _post_json(client, "/v1/grouped_completions", body)
    latency = time.perf_counter() - started
    answers = {answer.get("id"): answer for answer in payload.get("answers", [])}
    missing = [q.id for q in questions if q.id not in answers]
    if missing:
        raise ServerError(f"grouped completion has no answer for question ids {missing}")
    return [_grouped_reply(q.id, answers[q.id], latency) for q in questions]


def _grouped_reply(question_id: str, answer: dict, latency: float) -> Reply:
    usage = answer.get("usage") or {}
    return Reply(
        question_id=question_id,
        text=answer.get("text") or "",
        finish_reason=answer.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=_cached_tokens(usage),
        completion_tokens=usage.get("completion_tokens", 0),
        latency_s=latency,
    )


async def ask_chat(
    client: httpx.AsyncClient, settings: RequestSettings, question: Question, group_id: str,
    cache_salt: str,
) -> Reply:
    """One streaming POST /v1/chat/completions; with hints on, the group id goes along both
    as the body field and as the `X-Group-Id` header (a router can hash on a header only),
    and `cache_salt` as a body field. Without hints the request is plain OpenAI."""
    body = {
        "model": settings.model,
        "messages": question_messages(question.context, question.question),
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {}
    if settings.send_hints:
        body["group_id"], body["cache_salt"] = group_id, cache_salt
        headers["X-Group-Id"] = group_id
    started = time.perf_counter()
    pieces, finish_reason, usage, ttft = [], None, None, None
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=headers
        ) as response:
            await _raise_for_status(response)
            async for chunk in _sse_chunks(response):
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        pieces.append(content)
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        raise ServerError(f"/v1/chat/completions: {type(exc).__name__}: {exc}") from exc
    if usage is None:
        raise ServerError("the chat stream carried no usage: the server must honour "
                          "stream_options.include_usage")
    return Reply(
        question_id=question.id,
        text="".join(pieces),
        finish_reason=finish_reason,
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=_cached_tokens(usage),
        completion_tokens=usage.get("completion_tokens", 0),
        latency_s=time.perf_counter() - started,
        ttft_s=ttft,
    )


async def fetch_model_id(client: httpx.AsyncClient) -> str:
    """The first model the server lists (chat requests must name one)."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise ServerError(f"/v1/models: {type(exc).__name__}: {exc}") from exc
    await _raise_for_status(response)
    models = response.json().get("data") or []
    if not models:
        raise ServerError("the server lists no models; pass --model")
    return models[0]["id"]


def _cached_tokens(usage: dict) -> int:
    """A server that does not report cached tokens computed the whole prompt."""
    details = usage.get("prompt_tokens_details") or {}
    return details.get("cached_tokens") or 0


async def _post_json(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise ServerError(f"{path}: {type(exc).__name__}: {exc}") from exc
    await _raise_for_status(response)
    return response.json()


async def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    await response.aread()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise ServerError(f"{response.request.url.path} answered {response.status_code}: {message}")


async def _sse_chunks(response: httpx.Response):
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ServerError(f"error in the stream: {message}")
        yield chunk
