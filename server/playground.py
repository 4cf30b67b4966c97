"""The playground: one browser page, shipped in server/static/, that sends a document and many
questions to /v1/grouped_completions and shows the answers as they stream and the tokens the
group saved. `/` redirects to it; `--playground off` serves neither.

The page is plain files: its script only calls the public API, so it holds no power a client
lacks. Its Content-Security-Policy allows nothing but this origin's own script, style and
fetches: no inline script, no other site, no form submission (an API key typed into the page
can never end up in a URL).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException

from server.prompts import ANSWER_PATTERN, question_messages

STATIC = Path(__file__).parent / "static"
PAGE = "/playground"
ASSETS = {  # the files the page loads, by name, with their content types
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server's page is picked up at once
}

playground = APIRouter(include_in_schema=False)


@playground.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PAGE)


@playground.get(PAGE)
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)


@playground.get(PAGE + "/config.json")
async def page_config(request: Request) -> JSONResponse:
    """What the page cannot know by itself: the model, whether /v1 needs a key, the chat
    messages a grouped question is prompted with (`{context}` and `{question}` stand for the
    text), so its one-by-one mode sends plain chat requests with the very same prompts, and
    the pattern the grouped API extracts `answer` with, so that mode shows answers as it does."""
    services = request.app.state.services
    body = {"model": services.model_name,
            "api_key_required": bool(services.settings.api_keys),
            "chat_messages": question_messages("{context}", "{question}"),
            "answer_pattern": ANSWER_PATTERN.pattern}
    return JSONResponse(body, headers=SECURITY_HEADERS)


@playground.get(PAGE + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # only the page's own files, never a path into the package
        raise HTTPException(404)  # answered as an unknown route
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
