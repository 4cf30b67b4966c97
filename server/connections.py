"""Connections a slow or idle client cannot hold forever, and the uvicorn config that uses them.

uvicorn closes a keep-alive connection that stays idle after a response, but waits without
end for a client that opens a connection and sends nothing, or sends its headers or its body
a byte at a time. `GuardedH11Protocol` gives a connection `header_timeout_s` to deliver a
request's headers (from its opening, or from the previous response) and `body_timeout_s` to
deliver the body that follows; past that the connection is closed. A response being
streamed is never cut: the clocks run only while the server waits for the client.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args, header_timeout_s: float, body_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._timeouts = {"headers": header_timeout_s, "body": body_timeout_s}
        self._clock: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._wait_for("headers")

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._wait_for("body")
        elif state is not h11.IDLE:  # the request is in: the rest is the server's to do
            self._stop_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._wait_for("headers")  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _wait_for(self, part: str) -> None:
        if self._waiting_for == part:
            return
        self._stop_clock()
        self._waiting_for = part
        self._clock = self.loop.call_later(self._timeouts[part], self._too_slow)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._clock, self._waiting_for = None, None

    def _too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 0, *,
                   header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
                   max_connections: int | None = None, **options) -> uvicorn.Config:
    """uvicorn's config with guarded connections and, if given, a cap on open connections
    and requests (beyond it uvicorn answers 503)."""
    # uvicorn builds each connection's protocol by calling `http`, as it would call a class
    protocol = cast(type[asyncio.Protocol], partial(
        GuardedH11Protocol, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s))
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          limit_concurrency=max_connections, **options)
