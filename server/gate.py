"""What a request must pass before anything reads its body (pure ASGI): the API key of the
/v1 routes and the documentation pages (401), and the body size (413).

A route would parse the whole JSON body before its dependencies run; an unauthenticated or
oversized body would cost memory and time first. Here the key is checked from the headers,
a declared Content-Length over the limit is refused at once, and a body sent without one (or
longer than it said) is cut off when it passes the limit.
"""

from __future__ import annotations

import hmac

from server.errors import error_response

GUARDED_PREFIXES = ("/v1", "/docs", "/redoc", "/openapi.json")


class AuthenticationError(Exception):
    """A missing or wrong API key (401)."""


def tenant_of(authorization: str, keys: tuple[str, ...]) -> int:
    """The index of the configured key an `Authorization: Bearer KEY` header carries (0 when
    no key is configured). Every key is compared, so the time taken does not tell which one
    nearly matched."""
    if not keys:
        return 0
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthenticationError("missing API key: send 'Authorization: Bearer YOUR_KEY'")
    matches = [hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys]
    if not any(matches):
        raise AuthenticationError("incorrect API key")
    return matches.index(True)


class RequestGate:
    def __init__(self, app, api_keys: tuple[str, ...], max_request_bytes: int):
        self.app = app
        self.api_keys = api_keys
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope["headers"]}
        if scope["path"].startswith(GUARDED_PREFIXES):
            try:
                scope.setdefault("state", {})["tenant"] = tenant_of(
                    headers.get("authorization", ""), self.api_keys)
            except AuthenticationError as exc:
                await error_response(401, str(exc))(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit():  # the HTTP server holds the body to its declared length
            if int(declared) > self.max_request_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # no declared length (chunked): read up to the limit before anyone parses it
        body, message = bytearray(), {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client left
                break
            body += message.get("body", b"")
            if len(body) > self.max_request_bytes:
                await self._too_large(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        message = (f"the request body is larger than {self.max_request_bytes} bytes "
                   "(--max-request-bytes)")
        await error_response(413, message)(scope, receive, send)
