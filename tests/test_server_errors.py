"""Refused requests, in OpenAI's shape: 400 (not FastAPI's 422) naming the field, 400 for a
prompt longer than the context, 404 unknown model or route, 401 missing or wrong key.
Queue-full, draining, engine failures and disconnects are in test_server_failures.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.prompts import encode_chat

USER = [{"role": "user", "content": "Hello"}]


def post(server, path, payload=None, content=None, headers=None) -> httpx.Response:
    return httpx.post(f"{server.v1}{path}", json=payload, content=content, headers=headers,
                      timeout=30)


def assert_error(response, status: int, param=None, code=None, says=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert says in error["message"]
    return error


@pytest.fixture
def server(shared_server):
    return shared_server


# --- 400 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/chat/completions", "/grouped_completions"])
def test_invalid_json_is_400(server, path):
    json_header = {"content-type": "application/json"}
    response = post(server, path, content=b'{"messages": [', headers=json_header)
    assert_error(response, 400, None, "invalid_value", "not valid JSON")
    assert_error(post(server, path, payload=[1, 2]), 400, None, says="JSON object")
    as_text = {"content-type": "text/plain"}
    assert_error(post(server, path, content=b'{"messages": []}', headers=as_text), 400, None,
                 says="Content-Type: application/json")
    untyped = httpx.post(server.v1 + path, content=b'{"messages": []}')  # no Content-Type
    assert "content-type" not in untyped.request.headers
    assert_error(untyped, 400, None, says="Content-Type: application/json")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "stop": [""]}, "stop"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"messages": USER, "stream_options": {"include_usage": "x"}},
         "stream_options.include_usage"),
        ({"messages": USER, "group_id": ""}, "group_id"),
        ({"messages": USER, "logprobs": True}, "logprobs"),
        ({"messages": USER, "top_k": -1}, "top_k"),
        ({"messages": USER, "max_tokens": "5"}, "max_tokens"),  # no silent coercion
        ({"messages": USER, "max_tokens": True}, "max_tokens"),
        ({"messages": USER, "temperature": "0.5"}, "temperature"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "stream_options": {"include_usage": True, "x": 1}},
         "stream_options.x"),
        ({"messages": USER, "tools": []}, "tools"),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_field(server, payload, param):
    assert_error(post(server, "/chat/completions", payload), 400, param, says=param)


def test_unknown_chat_fields_are_named_not_dropped(server):
    payload = {"messages": USER, "max_tokens": 2, "mirostat": 2, "best_of": 3}
    assert_error(post(server, "/chat/completions", payload), 400, "mirostat",
                 says="mirostat: unsupported field")
    neutral = {"messages": USER, "max_tokens": 2, "user": "u1", "frequency_penalty": 0,
               "logit_bias": {}, "top_k": 5}
    assert post(server, "/chat/completions", neutral).status_code == 200


@pytest.mark.parametrize(
    ("payload", "param", "says"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty", "only 0, the neutral value"),
        ({"presence_penalty": -1}, "presence_penalty", "only 0, the neutral value"),
        ({"logit_bias": {"42": 5}}, "logit_bias", "only {}, the neutral value"),
    ],
)
def test_sampling_controls_say_only_their_neutral_value_is_supported(server, payload, param,
                                                                    says):
    assert_error(post(server, "/chat/completions", {"messages": USER, **payload}), 400, param,
                 says=says)


def test_content_of_the_wrong_type_says_text_parts_are_accepted_too(server):
    payload = {"messages": [{"role": "user", "content": 5}]}
    assert_error(post(server, "/chat/completions", payload), 400, "messages[0].content",
                 says="must be a string or a list of text parts")
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    payload = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    assert post(server, "/chat/completions", payload).status_code == 200


def test_n_other_than_1_is_refused_through_the_openai_client(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=USER, n=2)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "n" and "n=1" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"questions": ["q"]}, "context"),
        ({"context": "c", "questions": []}, "questions"),
        ({"context": "c", "questions": [""]}, "questions[0].question"),
        ({"context": "c", "questions": [{"id": "a", "question": "q"}, {"id": "a",
                                                                        "question": "r"}]},
         "questions"),
        ({"context": "c", "questions": ["q"], "contxt": "typo"}, "contxt"),
        ({"context": "c", "questions": ["q"], "max_tokens": -1}, "max_tokens"),
        ({"context": "c", "questions": ["q"], "max_tokens": "5"}, "max_tokens"),
        ({"context": "c", "questions": ["q"], "stream": 1}, "stream"),
        ({"context": "c", "questions": ["a", {"id": "0", "question": "b"}]}, "questions"),
    ],
)
def test_invalid_grouped_fields_are_400_naming_the_field(server, payload, param):
    assert_error(post(server, "/grouped_completions", payload), 400, param, says=param)


def test_prompt_longer_than_the_context_names_both_lengths(server, tiny_model):
    limit = tiny_model.max_context
    messages = [{"role": "user", "content": "x" * (limit + 10)}]
    prompt_length = len(encode_chat(tiny_model.tokenizer, messages))
    error = assert_error(post(server, "/chat/completions", {"messages": messages}), 400,
                         "messages")
    assert f"maximum context length is {limit} tokens" in error["message"]
    assert f"{prompt_length} in the prompt" in error["message"]
    too_long = {"context": "x" * (limit + 10), "questions": ["a", "b"]}
    error = assert_error(post(server, "/grouped_completions", too_long), 400, "context")
    assert f"maximum context length is {limit} tokens" in error["message"]
    assert error["message"].startswith("context: ")
    long_question = {"context": "short", "questions": ["a", "x" * (limit + 10)]}
    error = assert_error(post(server, "/grouped_completions", long_question), 400,
                         "questions[1].question")
    assert error["message"].startswith("questions[1].question: ")


def test_completion_budget_past_the_context_is_400_on_max_tokens(server, tiny_model):
    payload = {"messages": USER, "max_tokens": tiny_model.max_context}
    assert_error(post(server, "/chat/completions", payload), 400, "max_tokens",
                 says="maximum context length")


# --- 404, 405 --------------------------------------------------------------------------------

def test_unknown_model_is_404(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert caught.value.body["code"] == "model_not_found"
    grouped = {"model": "gpt-9", "context": "c", "questions": ["q"]}
    assert_error(post(server, "/grouped_completions", grouped), 404, "model", "model_not_found")
    assert_error(httpx.get(f"{server.v1}/models/gpt-9"), 404, "model", "model_not_found")


def test_unknown_route_and_method_in_openai_shape(server):
    assert_error(httpx.get(f"{server.v1}/nothing"), 404, None, "not_found")
    assert_error(httpx.get(f"{server.v1}/chat/completions"), 405, None, "method_not_allowed",
                 "/v1/chat/completions does not take GET; it takes POST")


# --- 401 -------------------------------------------------------------------------------------

def test_api_key_guards_every_v1_route(start_server):
    server = start_server(api_key="sekret")
    assert_error(post(server, "/chat/completions", {"messages": USER}), 401, None,
                 "invalid_api_key", "missing API key")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(post(server, "/chat/completions", {"messages": USER}, headers=wrong), 401)
    assert_error(httpx.get(f"{server.v1}/models", headers=wrong), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    client = openai.OpenAI(base_url=server.v1, api_key="sekret", max_retries=0)
    reply = client.chat.completions.create(model="tiny-random", messages=USER, max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()


def test_a_request_that_could_never_fit_the_kv_cache_is_400(start_server):
    server = start_server(kv_cache_mb=0.05)  # about 100 tokens of the tiny model
    capacity = server.app.state.services.model.limits.kv_capacity
    payload = {"messages": USER, "max_tokens": capacity}
    assert_error(post(server, "/chat/completions", payload), 400, "max_tokens", says="KV cache")
    grouped = {"context": "c" * 20, "questions": ["q"] * 4, "max_tokens": capacity // 4}
    assert_error(post(server, "/grouped_completions", grouped), 400, "max_tokens",
                 says="--kv-cache-mb")
    assert post(server, "/chat/completions", {"messages": USER, "max_tokens": 2}).is_success


def test_each_api_key_is_a_tenant_that_never_shares_cached_prefixes(start_server):
    server = start_server(api_key="alpha,beta")
    body = {"messages": [{"role": "user", "content": "A long shared question " * 4}],
            "max_tokens": 2, "temperature": 0}

    def cached(key: str, **extra) -> int:
        response = post(server, "/chat/completions", {**body, **extra},
                        headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("alpha") == 0
    assert cached("beta") == 0  # the other tenant sees nothing of alpha's prompt
    assert cached("beta", cache_salt="s") == 0
    assert cached("alpha") > 0 and cached("beta") > 0
    assert_error(post(server, "/chat/completions", body, headers={"Authorization": "Bearer x"}),
                 401, None, "invalid_api_key")


def test_more_questions_than_the_queue_can_ever_hold_is_400_not_429(start_server):
    server = start_server(max_queue=3)
    payload = {"context": "c", "questions": ["q1", "q2", "q3", "q4"], "max_tokens": 2}
    assert_error(post(server, "/grouped_completions", payload), 400, "questions",
                 "invalid_value", "more than the 3")
    payload["questions"] = payload["questions"][:3]
    assert post(server, "/grouped_completions", payload).is_success


@pytest.mark.parametrize("path", ["/chat/completions", "/grouped_completions"])
def test_poisoned_sampling_parameters_fail_alone_or_are_refused(server, path):
    body = ({"messages": USER} if path == "/chat/completions"
            else {"context": "c", "questions": ["q"]})
    body["max_tokens"] = 4
    assert_error(post(server, path, {**body, "seed": 2**64}), 400, "seed")
    greedy = post(server, path, {**body, "temperature": 0})
    tiny = post(server, path, {**body, "temperature": 1e-38})  # greedy, not inf / NaN
    assert greedy.status_code == tiny.status_code == 200
    if path == "/chat/completions":
        assert (tiny.json()["choices"][0]["message"]["content"]
                == greedy.json()["choices"][0]["message"]["content"])
    else:
        assert tiny.json()["answers"][0]["text"] == greedy.json()["answers"][0]["text"]


def test_a_body_over_the_limit_is_413_declared_or_chunked(start_server):
    server = start_server(max_request_bytes=2000)
    big = {"messages": [{"role": "user", "content": "x" * 3000}]}
    assert_error(post(server, "/chat/completions", big), 413, None, "request_too_large",
                 "--max-request-bytes")

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    chunked = httpx.post(f"{server.v1}/chat/completions", content=chunks(), timeout=30,
                         headers={"content-type": "application/json"})
    assert_error(chunked, 413, None, "request_too_large")
    assert post(server, "/chat/completions", {"messages": USER, "max_tokens": 2}).is_success


def test_the_key_is_checked_before_the_body_is_read(start_server):
    """A wrong key gets its 401 while the (huge, declared) body has not even been sent."""
    import socket
    from urllib.parse import urlparse

    server = start_server(api_key="sekret", max_request_bytes=10**9)
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                     b"Authorization: Bearer wrong\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500000000\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401")


def test_text_too_long_for_any_prompt_is_refused_before_tokenizing(server, tiny_model):
    services = server.app.state.services
    too_many = services.model.limits.max_context * services.model.prompts.max_token_chars + 1
    message = [{"role": "user", "content": "z" * too_many}]
    error = assert_error(post(server, "/chat/completions", {"messages": message}), 400,
                         "messages", says="characters")
    assert str(too_many) in error["message"]
    grouped = {"context": "z" * too_many, "questions": ["q"]}
    assert_error(post(server, "/grouped_completions", grouped), 400, "context",
                 says="characters")


def test_the_api_documentation_is_behind_the_key(start_server):
    server = start_server(api_key="sekret")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_error(httpx.get(f"{server.url}{path}"), 401, None, "invalid_api_key")
    allowed = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": "Bearer sekret"})
    assert allowed.status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open
