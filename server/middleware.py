"""The outer HTTP layers (pure ASGI, so streaming and disconnects pass through untouched): the
replica header on every response, the per-route status counter and a last-resort 500 in
OpenAI's shape for an exception no handler mapped (`ServingMiddleware`); HEAD answered wherever
GET is (`HeadAsGet`)."""

from __future__ import annotations

import json
import logging

from starlette.types import Message, Receive, Scope, Send

from server.errors import error_body
from server.metrics import ServerMetrics

log = logging.getLogger("groupwise.server")
REPLICA_HEADER = b"x-groupwise-replica"


class ServingMiddleware:
    def __init__(self, app, metrics: ServerMetrics, replica_name: str):
        self.app = app
        self.metrics = metrics
        self.replica = replica_name.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_with_header(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status is not None:  # the response had started: nothing more can be sent
                raise
            status = 500
            await self._send_error(send_with_header)
        finally:
            self.metrics.count_http(_route_label(scope), status or 500)

    async def _send_error(self, send) -> None:
        body = json.dumps(error_body(500, "internal server error")).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class HeadAsGet:
    """A HEAD request runs as the GET it asks about, and only its headers are sent: uptime
    checkers and proxies probe with HEAD, and HTTP wants it wherever GET works."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def _route_label(scope) -> str:
    """The route's path template (bounded label values); unmatched paths share one label."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
