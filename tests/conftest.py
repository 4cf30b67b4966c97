"""Shared fixtures: the tiny random model, and real HTTP servers around an app (in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import uvicorn

from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.sampling import SamplingParams
from model.prompts import encode_chat
from model.weights.loading import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """The tiny random Llama + byte tokenizer (milliseconds to build, read-only in tests)."""
    return load_model("tiny-random", device="cpu")


def engine_answer(loaded: LoadedModel, messages: list[dict], max_tokens: int,
                  **params) -> tuple[str, str, int]:
    """(text, finish_reason, prompt length) of one chat prompt decoded by the engine alone:
    the reference a served answer is compared with."""
    engine = GroupedEngine(loaded.model, loaded.tokenizer)
    prompt = encode_chat(loaded.tokenizer, messages)
    member = Member(prompt, SamplingParams(max_tokens=max_tokens, **params))
    events = list(engine.generate([[member]]))
    return "".join(e.text for e in events), events[-1].finish_reason, len(prompt)


@dataclass
class LiveServer:
    app: object
    url: str  # e.g. http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def live_server(app) -> Iterator[LiveServer]:
    """Serves `app` with uvicorn on a free port in a background thread; stops it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[object], LiveServer]]:
    """`serve(app)` starts a live server for `app`; every one is stopped after the test."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(live_server(app))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TEST_SETTINGS = {"model": "tiny-random", "csa": "off", "max_wait_ms": 5.0,
                 "replica_name": "test-replica"}


@pytest.fixture
def start_server(serve, tiny_model) -> Callable[..., LiveServer]:
    """`start_server(**settings)`: the real app on the tiny model, served on a free port."""
    from server.app import create_app
    from server.config import Settings

    def start(**overrides) -> LiveServer:
        settings = Settings(**{**TEST_SETTINGS, **overrides})
        return serve(create_app(settings, loaded_model=tiny_model))

    return start
