"""`python -m server` as a real process: settings from the environment, the replica header,
SIGTERM draining, and (slow) one end-to-end run on the embedded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.squad import SELECTION_FILE
from server.prompts import question_messages
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def server_process(*args: str, env: dict | None = None,
                   startup_s: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """Starts `python -m server --port N ARGS`, waits for /health; always stops it."""
    port = free_port()
    log = (Path(os.environ.get("TMPDIR", "/tmp")) / f"groupwise-test-{port}.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), *args], cwd=REPO,
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, startup_s, log)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def _wait_healthy(process, url: str, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


@pytest.mark.slow
def test_sigterm_drains_then_exits_cleanly():
    env = {"GROUPWISE_MAX_GROUP_SIZE": "2", "GROUPWISE_MAX_WAIT_MS": "60000",
           "GROUPWISE_REPLICA_NAME": "replica-from-env"}
    with server_process("--model", "tiny-random", "--threads", "1", env=env) as (process, url):
        health = httpx.get(f"{url}/health")
        assert health.headers["x-groupwise-replica"] == "replica-from-env"
        chat = f"{url}/v1/chat/completions"
        # waits for a second group member (60 s) that never comes: in flight at the signal
        payload = {"messages": [{"role": "user", "content": "Tell me a story"}],
                   "max_tokens": 300, "temperature": 0, "group_id": "drain"}
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("reply", httpx.post(chat, json=payload, timeout=60)))
        thread.start()
        deadline = time.monotonic() + 30
        while metric(url, "groupwise:num_requests_waiting") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        refused = httpx.post(chat, json=payload, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{url}/health").status_code == 503
        thread.join(60)
        reply = result["reply"]  # the drain ran its group without waiting out the 60 s
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert process.wait(30) == 0


@pytest.mark.slow
def test_embedded_model_end_to_end():
    """The default model behind a real process: a grouped request and the same questions as
    chat requests give the same answers (CSA off, greedy, float32 weights: the format in which
    grouping is exactly invariant)."""
    context = json.loads(SELECTION_FILE.read_text())["contexts"][0]
    questions = [q["question"] for q in context["questions"][:2]]
    with server_process("--csa", "off", "--weights", "loaded", "--threads", "1",
                        startup_s=300) as (process, url):
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct"]
        body = {"context": context["context"], "questions": questions, "max_tokens": 24}
        grouped = httpx.post(f"{url}/v1/grouped_completions", json=body, timeout=300).json()
        answers = grouped["answers"]
        assert "hemicycle" in answers[0]["text"].lower()  # the gold answer to question 0
        usage = grouped["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 200  # the passage, shared
        assert usage["computed_prompt_tokens"] < usage["prompt_tokens"]
        for answer, question in zip(answers, questions):
            chat = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
                "messages": question_messages(context["context"], question)}).json()
            assert chat["choices"][0]["message"]["content"] == answer["text"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0



@pytest.mark.slow
def test_a_second_sigterm_ends_in_flight_requests_with_an_error_and_exits():
    with server_process("--model", "tiny-random", "--threads", "1") as (process, url):
        payload = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4000,
                   "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload,
                          timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 8:  # generating: send both signals
                    process.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                    process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        error = events[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "shut down" in error["message"]
