"""What the benches that talk to a server share at their command line: argument types, the
server's URL, and the flags every such bench takes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: `kind` of the text, which must be above 0."""
    def parse(text: str) -> Number:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def base_url(url: str) -> str:
    """Accepts the server root or an OpenAI-style base URL ending in /v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """--max-tokens and --timeout: what each request may take."""
    parser.add_argument("--max-tokens", type=positive(int), default=96,
                        help="most generated tokens per answer (default 96)")
    parser.add_argument("--timeout", type=positive(float), default=600.0,
                        help="seconds per request (default 600)")


def add_start_timeout_flag(parser: argparse.ArgumentParser) -> None:
    """For a bench that starts its own servers."""
    parser.add_argument("--start-timeout", type=positive(float), default=600.0,
                        help="seconds a started server may take to become healthy (default 600)")
