"""The outer HTTP layers (server/middleware.py) on a real server around the tiny model: HEAD is
answered wherever GET is, with GET's status and headers and no body; every response names its
replica."""

from __future__ import annotations

import httpx

KEY = {"Authorization": "Bearer k"}
# every route that takes GET: the API's, the playground's (outside the schema), the docs'
GET_PATHS = ["/health", "/metrics", "/v1/models", "/v1/models/tiny-random", "/", "/playground",
             "/playground/config.json", "/playground/playground.js",
             "/playground/playground.css", "/docs", "/redoc", "/openapi.json"]


def test_head_answers_wherever_get_does(start_server):
    server = start_server(api_key="k")
    schema = httpx.get(f"{server.url}/openapi.json", headers=KEY).json()
    in_schema = {path for path, methods in schema["paths"].items() if "get" in methods}
    assert in_schema <= {p.replace("tiny-random", "{model_id}") for p in GET_PATHS}
    for path in GET_PATHS:
        get = httpx.get(server.url + path, headers=KEY)
        head = httpx.head(server.url + path, headers=KEY)
        assert (path, head.status_code) == (path, get.status_code)
        assert get.status_code in (200, 307)
        assert head.content == b""
        assert head.headers.get("content-type") == get.headers.get("content-type")
        assert head.headers["x-groupwise-replica"] == "test-replica"
        if path != "/metrics":  # its counters move between the two requests
            assert head.headers.get("content-length") == get.headers.get("content-length")


def test_head_is_refused_where_get_is(start_server):
    server = start_server(api_key="k")
    for path, status in [("/v1/chat/completions", 405), ("/nowhere", 404), ("/v1/models", 401)]:
        headers = {} if status == 401 else KEY
        assert httpx.head(server.url + path, headers=headers).status_code == status
        assert httpx.get(server.url + path, headers=headers).status_code == status
