"""The playground's HTTP side: where it is served, with which content types and security
headers, what its config tells the page, and `--playground off`. The page itself, in a real
browser, is tested in test_playground_browser.py."""

from __future__ import annotations

import re

import httpx
import pytest

from server.config import Settings, SettingsError
from server.playground import STATIC
from server.prompts import ANSWER_PATTERN, question_messages

ASSET_TYPES = {"/playground": "text/html", "/playground/playground.js": "text/javascript",
               "/playground/playground.css": "text/css"}


def get(server, path: str, **kwargs) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=30, **kwargs)


def test_root_redirects_to_the_page(start_server):
    server = start_server()
    response = get(server, "/")
    assert response.status_code == 307
    assert response.headers["location"] == "/playground"
    assert get(server, "/", follow_redirects=True).url.path == "/playground"


@pytest.mark.parametrize(("path", "content_type"), ASSET_TYPES.items())
def test_page_files_have_their_content_type_and_a_restrictive_policy(start_server, path,
                                                                     content_type):
    response = get(start_server(), path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "form-action 'none'" in policy and "unsafe" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_loads_only_its_own_files():
    html = (STATIC / "playground.html").read_text()
    loaded = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(loaded) == ["/playground/playground.css", "/playground/playground.js"]
    assert "<script>" not in html and " style=" not in html  # nothing inline for the CSP to block
    script = (STATIC / "playground.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "localStorage" not in script  # the API key is never saved


def test_only_the_pages_own_files_are_served(start_server):
    server = start_server()
    for path in ("/playground/nothing.js", "/playground/..%2Fplayground.py",
                 "/playground/%2E%2E%2Fapi.py"):
        response = get(server, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_config_gives_the_model_the_key_requirement_and_the_grouped_prompt(start_server):
    config = get(start_server(), "/playground/config.json").json()
    assert config == {"model": "tiny-random", "api_key_required": False,
                      "chat_messages": question_messages("{context}", "{question}"),
                      "answer_pattern": ANSWER_PATTERN.pattern}
    keyed = start_server(api_key="sesame")
    assert get(keyed, "/playground/config.json").json()["api_key_required"] is True
    # the page is public; only what it sends to /v1 needs the key
    assert get(keyed, "/playground").status_code == 200
    assert httpx.get(f"{keyed.v1}/models").status_code == 401


def test_playground_off_serves_neither_the_page_nor_the_redirect(start_server):
    server = start_server(playground=Settings.from_sources(["--playground", "off"]).playground)
    for path in ("/", "/playground", "/playground/playground.js", "/playground/config.json"):
        response = get(server, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["message"] == f"no route GET {path}"
    assert httpx.get(f"{server.v1}/models").status_code == 200  # the API is unchanged


def test_playground_setting_reads_on_and_off_only():
    assert Settings.from_sources([], environ={}).playground is True
    assert Settings.from_sources([], environ={"GROUPWISE_PLAYGROUND": "OFF"}).playground is False
    refused = r"--playground \(GROUPWISE_PLAYGROUND\): cannot read 'no'"
    with pytest.raises(SettingsError, match=refused):
        Settings.from_sources(["--playground", "no"], environ={})
