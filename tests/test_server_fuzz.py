"""A bounded property-based fuzz of both completion endpoints (hypothesis, fixed seed and example
budget): whatever the body, the server answers without a 5xx, every error is in OpenAI's
shape, and it keeps serving."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.test_server_errors import USER

pytestmark = pytest.mark.slow

EXAMPLES = 120
# any JSON value, kept small
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "robot"]) | JSON,
     "content": st.text(max_size=60) | JSON})
CHAT_FIELDS = {
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "max_tokens": st.integers(-2, 6) | JSON, "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-0.5, 1.5) | JSON, "top_k": st.integers(-2, 50) | JSON,
    "seed": st.integers(-(2**65), 2**65) | JSON, "stop": st.text(max_size=5) | JSON,
    "stream": st.booleans() | JSON, "n": st.integers(0, 3) | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "group_id": st.text(max_size=10) | JSON, "cache_salt": st.text(max_size=10) | JSON,
    "tools": JSON, "logprobs": JSON, "unknown_field": JSON,
}
GROUPED_FIELDS = {
    "context": st.text(max_size=200) | JSON,
    "questions": st.lists(st.text(max_size=40) | st.fixed_dictionaries(
        {"id": st.text(max_size=4) | JSON, "question": st.text(max_size=40) | JSON}),
        max_size=4) | JSON,
    "max_tokens": st.integers(-2, 6) | JSON, "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-0.5, 1.5) | JSON, "seed": st.integers(-(2**65), 2**65) | JSON,
    "system_prompt": st.text(max_size=30) | JSON, "stop": JSON, "stream": JSON,
    "cache_salt": JSON, "contxt": JSON,
}


def bodies(fields: dict) -> st.SearchStrategy:
    """Dicts with a random subset of the fields (unknown ones included), or any JSON."""
    keys = st.sets(st.sampled_from(sorted(fields)))
    chosen = keys.flatmap(lambda names: st.fixed_dictionaries({k: fields[k] for k in names}))
    return chosen | JSON


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    from server.app import create_app
    from server.config import Settings
    from tests.conftest import TEST_SETTINGS, live_server

    settings = Settings(**{**TEST_SETTINGS, "max_queue": 64})
    with live_server(create_app(settings, loaded_model=tiny_model)) as server:
        yield server


def check(server, path: str, body) -> None:
    response = httpx.post(f"{server.v1}{path}", json=body, timeout=60)
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert error["message"]
    elif "text/event-stream" in response.headers["content-type"]:
        assert response.text.rstrip().endswith("data: [DONE]")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@seed(20261124)
@FUZZ
@given(body=bodies(CHAT_FIELDS))
def test_chat_completions_never_answer_5xx(fuzz_server, body):
    check(fuzz_server, "/chat/completions", body)


@seed(20261124)
@FUZZ
@given(body=bodies(GROUPED_FIELDS))
def test_grouped_completions_never_answer_5xx(fuzz_server, body):
    check(fuzz_server, "/grouped_completions", body)


def test_the_server_still_serves_after_the_fuzz(fuzz_server):
    reply = httpx.post(f"{fuzz_server.v1}/chat/completions", timeout=60,
                       json={"messages": USER, "max_tokens": 2})
    assert reply.status_code == 200
