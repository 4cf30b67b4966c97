"""Slow and idle clients: a connection that does not deliver its headers or its body in time
is closed; a streamed response is never cut by those clocks."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest
import uvicorn

from server.app import create_app
from server.config import Settings
from server.connections import uvicorn_config
from tests.conftest import TEST_SETTINGS


@pytest.fixture
def guarded_url(tiny_model):
    app = create_app(Settings(**TEST_SETTINGS), loaded_model=tiny_model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn_config(app, header_timeout_s=0.5, body_timeout_s=0.5, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (recv returns b"") within `seconds`."""
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_an_idle_connection_is_closed(guarded_url):
    with socket.create_connection(guarded_url) as idle:
        assert closed_within(idle, 5)


def test_headers_dribbled_a_byte_at_a_time_are_cut_off(guarded_url):
    with socket.create_connection(guarded_url) as slow:
        request = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
        closed = False
        for byte in request:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        assert closed or closed_within(slow, 5)


def test_a_body_that_never_arrives_is_cut_off(guarded_url):
    with socket.create_connection(guarded_url) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert closed_within(slow, 5)


def test_a_complete_request_is_answered_and_the_connection_serves_another(guarded_url):
    connection = http.client.HTTPConnection(*guarded_url, timeout=10)
    for _ in range(2):  # one keep-alive connection, two requests
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and b"ok" in response.read()
    connection.close()
