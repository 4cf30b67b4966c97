"""Start-up as a probe and a user see it: the port answers 503 while the model loads, and what
can be refused without the model (a bad flag, a missing file, a busy port) is refused before the
load begins, before torch is even imported."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.services import Services
from tests.conftest import TEST_SETTINGS

REPO = Path(__file__).resolve().parent.parent

# runs `python -m server ARGS` in a fresh interpreter, then says whether the model code came in
PROBE = """
import sys
from server.__main__ import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("heavy modules imported:", sorted({"torch", "transformers"} & set(sys.modules)))
sys.exit(code)
"""


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def held_load(monkeypatch, tiny_model):
    """The model load waits for `release.set()`: start-up held at an exact point."""
    release, started = threading.Event(), threading.Event()
    load = Services.load

    def held(services, loaded=None):
        started.set()
        assert release.wait(60), "the test never released the load"
        load(services, tiny_model)

    monkeypatch.setattr(Services, "load", held)
    yield started, release
    release.set()


def test_the_port_answers_503_starting_until_the_model_is_loaded(serve, held_load):
    started, release = held_load
    server = serve(create_app(Settings(**TEST_SETTINGS)))  # returns once the port is open
    assert started.wait(30)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    assert health.json() == {"status": "starting", "model": None}
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for reply in (httpx.get(f"{server.v1}/models"),
                  httpx.post(f"{server.v1}/chat/completions", json=chat),
                  httpx.post(f"{server.v1}/grouped_completions",
                             json={"context": "c", "questions": ["q"]})):
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "starting" and error["type"] == "service_unavailable"
        assert "loading" in error["message"]
    release.set()
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{server.url}/health")).status_code == 503:
        assert health.json()["status"] == "starting"
        assert time.monotonic() < deadline, "the model never became ready"
        time.sleep(0.02)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": "tiny-random"}
    reply = httpx.post(f"{server.v1}/chat/completions", json=chat, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_a_failed_load_turns_health_to_failed(serve, monkeypatch):
    """`python -m server` then exits with the reason (test_server_config.py); an app served
    some other way keeps saying why it cannot serve."""
    def fail(services, loaded=None):
        raise FileNotFoundError("no model here")

    monkeypatch.setattr(Services, "load", fail)
    app = create_app(Settings(**TEST_SETTINGS))
    server = serve(app)
    deadline = time.monotonic() + 30
    while app.state.services.load_error is None:
        assert time.monotonic() < deadline, "the load never failed"
        time.sleep(0.01)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json() == {"status": "failed", "model": None}
    assert httpx.get(f"{server.v1}/models").json()["error"]["code"] == "load_failed"


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--help"], 0, ""),
        (["--mistyped-flag"], 2, "unrecognized arguments: --mistyped-flag"),
        (["--port", "70000"], 2, "--port (GROUPWISE_PORT): must be in 0..65535, got 70000"),
        (["--csa", "no/such/checkpoint"], 2,
         "--csa (GROUPWISE_CSA): must be auto, off or a CSA checkpoint directory"),
        (["--model", "missing.gguf"], 2, "--model (GROUPWISE_MODEL): GGUF file not found"),
    ],
)
def test_what_needs_no_model_is_refused_before_the_load(args, status, says):
    done = run_main(*args)
    assert done.returncode == status, done.stderr
    assert says in done.stderr
    assert "heavy modules imported: []" in done.stdout  # so no model load had begun
    assert "loading the model" not in done.stderr


def test_a_busy_port_is_refused_before_the_load():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_main("--model", "tiny-random", "--port", str(port))
    assert done.returncode == 1
    assert f"cannot bind 127.0.0.1:{port} (--port, GROUPWISE_PORT)" in done.stderr
    assert "heavy modules imported: []" in done.stdout
    assert "loading the model" not in done.stderr
