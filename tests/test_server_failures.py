"""Failures while serving: 429 when the queue is full, 503 while draining, 500 when an engine
step raises (what was in the engine fails; the server keeps serving), and clients that leave
while queued or mid-stream. Engine steps are gated, so each case happens in a known order."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from server.app import begin_drain, is_drained
from tests.conftest import engine_answer
from tests.test_server_errors import USER, assert_error, post


@pytest.fixture
def server(start_server):
    return start_server()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class GatedStep:
    """Stands in for engine.step (in the worker thread): every step runs, then waits at the
    gate before its events go out; with `fail_first`, the first step raises once the gate
    opens instead of running."""

    def __init__(self, engine, fail_first: bool = False):
        self._step = engine.step
        self.gate = threading.Event()
        self.steps = 0
        self.fail_first = fail_first

    def __call__(self):
        self.steps += 1
        if self.fail_first and self.steps == 1:
            assert self.gate.wait(20), "the test never opened the gate"
            raise RuntimeError("injected failure")
        events = self._step()
        assert self.gate.wait(20), "the test never opened the gate"
        return events


def gate_engine(server, monkeypatch, **kwargs) -> GatedStep:
    engine = server.app.state.services.engine
    gated = GatedStep(engine, **kwargs)
    monkeypatch.setattr(engine, "step", gated)
    return gated


def raw_post(server, path: str, payload: dict) -> socket.socket:
    """A request on a bare socket, so the test decides when the client goes away."""
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    body = json.dumps(payload).encode()
    head = (f"POST /v1{path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def read_status(sock: socket.socket) -> int:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1])


def dispatcher_of(server):
    return server.app.state.services.dispatcher


def counter(server, name: str, **labels) -> float:
    value = server.app.state.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- 429, 503, 500 -----------------------------------------------------------------------------

def test_full_queue_is_429_and_a_queued_client_that_leaves_frees_its_slot(start_server,
                                                                          monkeypatch):
    server = start_server(max_queue=2)
    gated = gate_engine(server, monkeypatch)
    running = raw_post(server, "/chat/completions", {"messages": USER, "max_tokens": 2})
    # admitted in the step now running; it counts as waiting until that step reports back
    wait_until(lambda: gated.steps == 1)
    waiting = raw_post(server, "/chat/completions", {"messages": USER, "max_tokens": 2})
    wait_until(lambda: dispatcher_of(server).num_waiting == 2)
    payload = {"context": "c", "questions": ["q"]}
    refused = post(server, "/grouped_completions", payload)
    assert_error(refused, 429, None, "queue_full", "queue is full")
    assert refused.headers["retry-after"] == "1"
    assert_error(post(server, "/chat/completions", {"messages": USER}), 429)
    waiting.close()  # the client gives up: the engine drops its question at the next step
    # the gate opens once the server has noticed: else the question may finish first
    wait_until(lambda: any(q.member.is_aborted for q in dispatcher_of(server)._in_engine))
    gated.gate.set()
    wait_until(lambda: counter(server, "groupwise:request_success_total",
                               finish_reason="abort") == 1)
    wait_until(lambda: dispatcher_of(server).num_waiting == 0)
    assert read_status(running) == 200
    assert post(server, "/chat/completions", {"messages": USER, "max_tokens": 2}).is_success


def test_draining_refuses_new_work_and_finishes_in_flight(server, monkeypatch):
    gated = gate_engine(server, monkeypatch)
    in_flight = raw_post(server, "/chat/completions", {"messages": USER, "max_tokens": 3})
    wait_until(lambda: gated.steps == 1)
    begin_drain(server.app)
    assert not is_drained(server.app)
    assert_error(post(server, "/chat/completions", {"messages": USER}), 503, None, "draining")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"
    gated.gate.set()
    assert read_status(in_flight) == 200
    wait_until(lambda: is_drained(server.app))


def test_a_failed_step_fails_what_is_in_the_engine_and_the_server_goes_on(server, monkeypatch):
    gated = gate_engine(server, monkeypatch, fail_first=True)
    doomed = raw_post(server, "/chat/completions", {"messages": USER, "max_tokens": 3})
    wait_until(lambda: gated.steps == 1)
    result = {}
    later = threading.Thread(target=lambda: result.setdefault(
        "response", post(server, "/chat/completions", {"messages": USER, "max_tokens": 3})))
    later.start()
    wait_until(lambda: dispatcher_of(server).num_in_flight == 2)
    gated.gate.set()
    assert read_status(doomed) == 500
    later.join(30)
    assert result["response"].status_code == 200  # it reached the engine after the failure
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_engine_failure_is_500_in_openai_shape(server, monkeypatch):
    gated = gate_engine(server, monkeypatch, fail_first=True)
    gated.gate.set()
    error = assert_error(post(server, "/grouped_completions", {"context": "c", "questions": ["q"]}),
                         500, None, "engine_error", "injected failure")
    assert error["type"] == "server_error"
    payload = {"messages": USER, "max_tokens": 2, "stream": True}
    assert post(server, "/chat/completions", payload).status_code == 200


def test_stream_failing_before_its_first_token_is_a_500(server, monkeypatch):
    gate_engine(server, monkeypatch, fail_first=True).gate.set()
    payload = {"messages": USER, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=payload, timeout=30) as r:
        assert r.status_code == 500
        assert json.loads(r.read())["error"]["code"] == "engine_error"


# --- disconnects -----------------------------------------------------------------------------

def stream_text(server, payload: dict) -> str:
    text = ""
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                text += choices[0]["delta"].get("content") or "" if choices else ""
    return text


def test_client_leaving_mid_stream_leaves_its_group_undisturbed(start_server, tiny_model):
    server = start_server(max_group_size=2, max_wait_ms=20000)  # the group starts when full
    leaver = [{"role": "user", "content": "Tell me a story"}]
    stayer = [{"role": "user", "content": "The quick brown fox"}]
    assert engine_answer(tiny_model, leaver, 8)[1] == "length"  # it would not stop by itself
    expected, _, _ = engine_answer(tiny_model, stayer, 40)
    result = {}
    stay = {"messages": stayer, "max_tokens": 40, "temperature": 0, "stream": True,
            "group_id": "pair"}
    thread = threading.Thread(target=lambda: result.setdefault("text", stream_text(server, stay)))
    thread.start()
    wait_until(lambda: dispatcher_of(server).queue.num_waiting == 1)
    leave = {**stay, "messages": leaver, "max_tokens": 1000}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=leave, timeout=60) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    thread.join(60)
    assert result["text"] == expected
    wait_until(lambda: counter(server, "groupwise:request_success_total",
                               finish_reason="abort") == 1)
    metrics = server.app.state.services.metrics
    assert metrics.registry.get_sample_value("groupwise:group_size_sum") == 2
    assert counter(server, "groupwise:generation_tokens_total") < 1000
