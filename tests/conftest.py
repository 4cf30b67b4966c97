"""Shared fixtures: the tiny random model, the device the engine tests run on, and real HTTP
servers around an app (in a thread).

The engine tests against the unbatched reference run on the CPU, or on a GPU when asked:
`pytest --device cuda [--dtype bfloat16]` (or GROUPWISE_TEST_DEVICE / GROUPWISE_TEST_DTYPE);
without a GPU those are skipped. On the CPU the Triton kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os
import sys


def _asked_device() -> str:
    for index, argument in enumerate(sys.argv):
        if argument == "--device" and index + 1 < len(sys.argv):
            return sys.argv[index + 1]
        if argument.startswith("--device="):
            return argument.split("=", 1)[1]
    return os.environ.get("GROUPWISE_TEST_DEVICE", "cpu")


# Triton decides when a kernel is defined whether it runs in the interpreter, and importing
# transformers imports Triton: so this is settled before anything else is imported.
if _asked_device() == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import torch
import uvicorn

from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.sampling import SamplingParams
from model.native import isa_cap, runnable_isas, use_isa_cap
from model.weights.loading import LoadedModel, load_model
from model.weights.tiny import TinyModel, build_tiny_model
from server.prompts import encode_chat

# The tiny model's operations are too small to gain from a second thread, and on a CPU shared
# with other work torch's threads wait on each other: one thread makes this suite several times
# faster on the 2-core development machine. (Servers and benches the tests start as processes
# keep torch's default.)
torch.set_num_threads(1)
# GROUPWISE_CPU_ISA caps the CPU kernels of the whole run, as it caps a server's: on an AVX-512
# machine, `GROUPWISE_CPU_ISA=avx2 make test` runs the suite as an AVX2 machine would
use_isa_cap(os.environ.get("GROUPWISE_CPU_ISA"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("GROUPWISE_TEST_DEVICE", "cpu"),
                     choices=["cpu", "cuda"], help="where the engine tests run (default cpu)")
    parser.addoption("--dtype", default=os.environ.get("GROUPWISE_TEST_DTYPE", "float32"),
                     choices=["float32", "bfloat16"], help="their dtype (default float32)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the engine tests run on (--device); a GPU asked for but absent skips them."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no GPU here")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture(params=runnable_isas())
def isa(request: pytest.FixtureRequest) -> str:
    """Each instruction set whose CPU kernels this machine runs (`model.native`): a kernel test
    runs once per variant (all compute the same bits; tests/test_kernel_variants.py)."""
    return request.param


@pytest.fixture
def capped_isa(isa: str) -> Iterator[str]:
    """`isa`, with the CPU kernels capped to it for the test: what loads in it runs that
    variant."""
    with isa_capped(isa):
        yield isa


@contextmanager
def isa_capped(cap: str) -> Iterator[None]:
    previous = isa_cap()
    use_isa_cap(cap)
    try:
        yield
    finally:
        use_isa_cap(previous)


@pytest.fixture(scope="module")
def tiny(device: torch.device, dtype: torch.dtype) -> TinyModel:
    """The tiny model on the test device, in the test dtype (--device, --dtype): the engine
    tests against the unbatched reference."""
    tiny = build_tiny_model()
    tiny.model.to(device, dtype)
    return tiny


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


@pytest.fixture(scope="module")
def shared_server(tiny_model) -> Iterator[LiveServer]:
    """One server with the test settings for a whole module, whose tests each send requests
    that stand alone (refusals): a server costs a few tenths of a second to start and stop."""
    from server.app import create_app
    from server.config import Settings

    with live_server(create_app(Settings(**TEST_SETTINGS), loaded_model=tiny_model)) as server:
        yield server


@pytest.fixture
def start_server(serve, tiny_model) -> Callable[..., LiveServer]:
    """`start_server(**settings)`: the real app on the tiny model, served on a free port."""
    from server.app import create_app
    from server.config import Settings

    def start(**overrides) -> LiveServer:
        settings = Settings(**{**TEST_SETTINGS, **overrides})
        return serve(create_app(settings, loaded_model=tiny_model))

    return start
