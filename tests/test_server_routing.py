"""What the cache-aware router (vllm-router, deploy/router) needs from a replica, on a real
server around the tiny model: the token ids of a chat prompt (/v1/chat/completions/render),
and acceptance of the fields the router writes into every chat request, at their values only.
"""

from __future__ import annotations

import httpx
import pytest

from server.app import begin_drain
from server.prompts import encode_chat
from tests.test_server_errors import assert_error, post

MESSAGES = [{"role": "system", "content": "A passage."}, {"role": "user", "content": "Why?"}]
# what vllm-router 0.1.17 adds to a chat request that did not set them
ROUTER_DEFAULTS = {"logprobs": False, "no_stop_trim": False, "ignore_eos": False,
                   "continue_final_message": False, "skip_special_tokens": True,
                   "separate_reasoning": True, "stream_reasoning": True,
                   "return_hidden_states": False, "include_reasoning": True}


@pytest.fixture
def server(start_server):
    return start_server()


def test_render_gives_the_prompt_token_ids_the_chat_request_computes(server, tiny_model):
    rendered = post(server, "/chat/completions/render",
                    {"model": "tiny-random", "messages": MESSAGES, **ROUTER_DEFAULTS})
    assert rendered.status_code == 200, rendered.text
    assert rendered.json() == {"token_ids": encode_chat(tiny_model.tokenizer, MESSAGES)}
    answered = post(server, "/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert answered.json()["usage"]["prompt_tokens"] == len(rendered.json()["token_ids"])


def prompt_tokens_billed(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("groupwise:prompt_tokens_total"))


def test_render_runs_nothing(server):
    rendered = post(server, "/chat/completions/render", {"messages": MESSAGES}).json()
    assert prompt_tokens_billed(server) == 0
    post(server, "/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert prompt_tokens_billed(server) == len(rendered["token_ids"])


def test_render_refuses_what_the_chat_request_refuses(server):
    assert_error(post(server, "/chat/completions/render", {"messages": []}), 400, "messages")
    assert_error(post(server, "/chat/completions/render",
                      {"model": "other", "messages": MESSAGES}), 404, "model")
    begin_drain(server.app)  # a draining replica must not attract new prompts
    assert_error(post(server, "/chat/completions/render", {"messages": MESSAGES}), 503)


def test_the_router_defaults_are_accepted(server):
    answered = post(server, "/chat/completions",
                    {"messages": MESSAGES, "max_tokens": 2, **ROUTER_DEFAULTS})
    assert answered.status_code == 200, answered.text


@pytest.mark.parametrize("field", sorted(set(ROUTER_DEFAULTS) - {"logprobs", "ignore_eos"}))
def test_any_other_value_of_a_router_field_is_400_naming_it(server, field):
    """ignore_eos and logprobs are the server's own fields, tested with the others."""
    asked = not ROUTER_DEFAULTS[field]
    assert_error(post(server, "/chat/completions", {"messages": MESSAGES, field: asked}),
                 400, field, says=f"only {str(not asked).lower()} is supported")
    assert_error(post(server, "/chat/completions", {"messages": MESSAGES, field: "yes"}),
                 400, field)
