"""The playground page in a real browser: Debian's headless Chromium driven by Playwright,
against live servers on the tiny random model. What the page shows is compared with what the
API answers for the same request, sent by this test to a second, fresh server (each server
has its own prefix cache, so both start from the same state)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from server.prompts import question_messages

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (deploy/install-test-deps.sh)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
    # without these Chromium calls home, and the closed network refuses its connections
    "--disable-background-networking", "--disable-component-update",
]
PASSAGE = ("The Amazon rainforest covers much of the Amazon basin of South America. "
           "The basin spans nine nations and about seven million square kilometres.")
QUESTIONS = ["Which continent is it on?", "How many nations?", "How large is the basin?"]
MAX_TOKENS = 12
WAIT_MS = 20_000  # the tiny model answers in well under a second; a busy machine is slower


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "install Debian's chromium: sh deploy/install-test-deps.sh"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    """A fresh page that fails the test on a script error or anything the page's CSP blocks.
    Chromium also logs each HTTP error status ("Failed to load resource"): those are the
    errors the tests provoke, and the missing favicon."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: message.type == "error"
            and not message.text.startswith("Failed to load resource")
            and problems.append(message.text))
    yield page
    context.close()
    assert not problems, problems


def open_playground(page: Page, server) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("#model-name")).to_have_text("tiny-random")  # the page learnt it


def type_request(page: Page, passage: str, questions: list[str]) -> None:
    """As a person would: the passage, then the questions, Enter or the button for each next."""
    page.get_by_label("Document").fill(passage)
    page.get_by_label("Question 1", exact=True).fill(questions[0])
    for number, question in enumerate(questions[1:], start=2):
        if number % 2:
            page.get_by_role("button", name="Add a question").click()
        else:
            page.get_by_label(f"Question {number - 1}", exact=True).press("Enter")
        expect(page.get_by_label(f"Question {number}", exact=True)).to_be_focused()
        page.keyboard.type(question)
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))


def ask_and_wait(page: Page, runs: int) -> dict:
    """Clicks Ask, waits for the run's row in the table; returns its figures."""
    page.get_by_role("button", name="Ask").click()
    row = page.locator("#runs tbody tr").nth(runs - 1)
    expect(row).to_be_visible()
    return {cell.get_attribute("data-figure"): cell.text_content()
            for cell in row.locator("td").all()}


def answers(page: Page) -> list[str]:
    return page.locator("#questions .answer").all_text_contents()


def error_text(page: Page) -> str:
    expect(page.get_by_role("alert")).not_to_be_empty()
    return page.get_by_role("alert").text_content()


def api_grouped(server, questions=QUESTIONS) -> dict:
    body = {"context": PASSAGE, "questions": questions, "max_tokens": MAX_TOKENS,
            "temperature": 0}
    response = httpx.post(f"{server.v1}/grouped_completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_three_questions_stream_into_their_rows_with_the_usage_the_api_reports(
        page, start_server):
    server, reference = start_server(), start_server()
    open_playground(page, server)
    type_request(page, PASSAGE, QUESTIONS)
    with page.expect_request("**/v1/grouped_completions") as sent:
        first = ask_and_wait(page, runs=1)
    assert json.loads(sent.value.post_data) == {
        "context": PASSAGE, "questions": QUESTIONS, "max_tokens": MAX_TOKENS,
        "temperature": 0, "stream": True}

    expected = api_grouped(reference)
    # the tiny random model writes no <answer> tags: the row shows all it wrote
    assert [answer["answer"] for answer in expected["answers"]] == [None] * 3
    assert answers(page) == [answer["text"] for answer in expected["answers"]]
    assert page.locator("#questions .raw").evaluate_all("rows => rows.map(r => r.hidden)") == [
        True] * 3
    usage = expected["usage"]
    billed, computed = usage["prompt_tokens"], usage["computed_prompt_tokens"]
    assert first["mode"] == "grouped" and first["questions"] == "3"
    assert int(first["billed"]) == billed and int(first["computed"]) == computed < billed
    assert first["saved"] == f"{100 * (billed - computed) / billed:.1f}%"
    assert int(first["generated"]) == usage["completion_tokens"]
    assert first["first-token"].endswith(" s") and first["total"].endswith(" s")
    for meta, answer in zip(page.locator(".answer-meta").all_text_contents(), expected["answers"]):
        assert f"{answer['usage']['completion_tokens']} tokens" in meta

    # the same document again: the prefix cache serves what the first ask computed
    second = ask_and_wait(page, runs=2)
    assert second["billed"] == first["billed"]
    assert int(second["computed"]) < int(first["computed"])
    assert int(second["computed"]) == api_grouped(reference)["usage"]["computed_prompt_tokens"]


def test_one_by_one_asks_plain_chat_requests_with_the_grouped_prompts(page, start_server):
    server, reference = start_server(), start_server()
    open_playground(page, server)
    type_request(page, PASSAGE, QUESTIONS)
    page.get_by_role("switch", name="One by one").check()
    sent = []
    page.on("request", lambda request: "/v1/" in request.url and sent.append(request))
    figures = ask_and_wait(page, runs=1)

    assert [request.url.removeprefix(server.url) for request in sent] == [
        "/v1/chat/completions"] * 3
    bodies = [json.loads(request.post_data) for request in sent]
    assert [body["messages"] for body in bodies] == [
        question_messages(PASSAGE, question) for question in QUESTIONS]
    expected = []
    for body in bodies:  # the same requests, in the same order, to a fresh server
        response = httpx.post(f"{reference.v1}/chat/completions",
                              json={**body, "stream": False, "stream_options": None}, timeout=60)
        expected.append(response.json()["usage"])
    assert figures["mode"] == "one by one"
    assert int(figures["billed"]) == sum(u["prompt_tokens"] for u in expected)
    assert int(figures["billed"]) == api_grouped(reference)["usage"]["prompt_tokens"]
    assert int(figures["computed"]) == sum(u["computed_prompt_tokens"] for u in expected)
    assert all(answers(page))


def test_pasting_several_lines_adds_one_question_per_line(page, start_server):
    open_playground(page, start_server())
    first = page.get_by_label("Question 1", exact=True)
    first.evaluate("""(input, text) => {
        const data = new DataTransfer();
        data.setData("text/plain", text);
        input.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true,
                                                         cancelable: true}));
    }""", "\n".join(QUESTIONS) + "\n\n")
    values = [box.input_value() for box in page.locator(".question-text").all()]
    assert values == QUESTIONS
    page.get_by_role("button", name="Remove question 2").click()
    values = [box.input_value() for box in page.locator(".question-text").all()]
    assert values == [QUESTIONS[0], QUESTIONS[2]]
    expect(page.get_by_label("Question 2", exact=True)).to_have_value(QUESTIONS[2])


def test_a_missing_key_is_shown_in_words_and_the_key_stays_out_of_the_url(page, start_server):
    server = start_server(api_key="sesame")
    open_playground(page, server)
    key = page.get_by_label("API key")
    expect(key).to_be_visible()  # the server has keys
    type_request(page, PASSAGE, QUESTIONS[:1])
    page.get_by_role("button", name="Ask").click()

    assert "needs a valid API key" in error_text(page)
    assert "missing API key" in error_text(page)  # the server's own words
    expect(key).to_be_focused()
    expect(key).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Document")).to_have_value(PASSAGE)  # nothing typed is lost
    expect(page.get_by_label("Question 1", exact=True)).to_have_value(QUESTIONS[0])

    key.fill("sesame")
    with page.expect_request("**/v1/grouped_completions") as sent:
        ask_and_wait(page, runs=1)
    assert sent.value.headers["authorization"] == "Bearer sesame"
    expect(page.get_by_role("alert")).to_be_empty()
    assert "sesame" not in page.url
    stored = page.evaluate("JSON.stringify([{...localStorage}, {...sessionStorage}])")
    assert "sesame" not in stored


def test_a_refused_field_is_shown_in_words_and_pointed_at(page, start_server):
    open_playground(page, start_server())
    type_request(page, PASSAGE, [QUESTIONS[0], ""])
    page.keyboard.press("Control+Enter")  # asks from any field

    said = error_text(page)
    assert said.startswith("The server refused the request: questions[1].question:")
    assert "Field: Question 2." in said
    blank = page.get_by_label("Question 2", exact=True)
    expect(blank).to_be_focused()
    expect(blank).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Question 1", exact=True)).to_have_value(QUESTIONS[0])
    expect(page.get_by_label("Document")).to_have_value(PASSAGE)


def test_a_document_over_the_size_limit_is_413_in_words(page, start_server):
    open_playground(page, start_server(max_request_bytes=4000))
    long_passage = PASSAGE * 40
    type_request(page, long_passage, QUESTIONS[:1])
    page.get_by_role("button", name="Ask").click()
    assert "too large for this server" in error_text(page)
    assert "larger than 4000 bytes" in error_text(page)
    expect(page.get_by_label("Document")).to_have_value(long_passage)


def sse(*events: dict, done: bool = True) -> str:
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + (
        "data: [DONE]\n\n" if done else "")


def chunk(index: int, delta: str, **final) -> dict:
    return {"object": "grouped_completion.chunk",
            "answers": [{"index": index, "id": str(index), "delta": delta,
                         "finish_reason": None, **final}]}


def test_an_answer_made_of_markup_is_shown_as_text(page, start_server):
    """The tiny random model cannot be made to write markup, so the browser answers the page's
    request itself (Playwright's page.route) with a grouped stream in the API's shapes."""
    markup = "<img src=x onerror=alert(1)>"
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
             "prompt_tokens_details": {"cached_tokens": 0}, "computed_prompt_tokens": 10}
    stream = sse(chunk(0, markup),
                 chunk(0, "", finish_reason="stop", text=markup, usage=usage),
                 {"object": "grouped_completion.chunk", "answers": [], "usage": usage})
    page.route("**/v1/grouped_completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=stream))
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:1])
    ask_and_wait(page, runs=1)

    assert answers(page) == [markup]
    assert page.locator("#questions img").count() == 0
    assert dialogs == []


def test_a_row_shows_the_answer_in_its_tags_and_the_raw_text_on_demand(page, start_server):
    """The grouped API's `answer` takes the row once the question is done; the tiny model
    writes no tags, so the browser answers the page's request itself, in the API's shapes."""
    raw = "<answer> South America </answer> because the basin is there"
    usage = {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19,
             "prompt_tokens_details": {"cached_tokens": 0}, "computed_prompt_tokens": 10}
    stream = sse(chunk(0, raw[:20]), chunk(0, raw[20:]),
                 chunk(0, "", finish_reason="stop", text=raw, answer="South America",
                       usage=usage),
                 {"object": "grouped_completion.chunk", "answers": [], "usage": usage})
    page.route("**/v1/grouped_completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=stream))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:1])
    ask_and_wait(page, runs=1)

    assert answers(page) == ["South America"]
    raw_text = page.locator("#questions .raw-text")
    expect(raw_text).to_be_hidden()
    page.get_by_text("Raw text").click()
    expect(raw_text).to_have_text(raw)


def test_one_by_one_shows_the_answer_in_its_tags_as_the_grouped_api_extracts_it(
        page, start_server):
    """The chat API gives no `answer`: the page extracts it with the server's pattern."""
    raw = "<answer>\nnine nations</answer>"
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
             "prompt_tokens_details": {"cached_tokens": 0}, "computed_prompt_tokens": 10}
    choice = {"index": 0, "delta": {"content": raw}, "finish_reason": None}
    stream = sse({"object": "chat.completion.chunk", "choices": [choice]},
                 {"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                 {"object": "chat.completion.chunk", "choices": [], "usage": usage})
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=stream))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:2])
    page.get_by_role("switch", name="One by one").check()
    ask_and_wait(page, runs=1)

    assert answers(page) == ["nine nations", "nine nations"]
    page.get_by_text("Raw text").first.click()
    expect(page.locator("#questions .raw-text").first).to_have_text(raw)


def test_a_full_queue_says_when_to_retry(page, start_server):
    """The queue cannot be filled on purpose in a test this short: the browser answers with the
    server's 429 reply (page.route)."""
    error = {"error": {"message": "the queue is full", "type": "rate_limit_error",
                       "param": None, "code": "queue_full"}}
    page.route("**/v1/grouped_completions", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "3"}, json=error))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:1])
    page.get_by_role("button", name="Ask").click()
    assert error_text(page) == ("The server is busy (the queue is full). "
                                "Retry after 3 seconds.")
    expect(page.get_by_role("button", name="Ask")).to_be_enabled()


def test_a_dropped_connection_keeps_what_arrived(page, start_server):
    """A stream cut off before [DONE], its two questions' chunks interleaved (page.route),
    then a connection reset outright."""
    cut_off = sse(chunk(1, "the second "), chunk(0, "half an "), chunk(1, "answer"),
                  chunk(0, "ans"), done=False)
    page.route("**/v1/grouped_completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=cut_off))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:2])
    page.get_by_role("button", name="Ask").click()
    assert "connection to the server dropped" in error_text(page)
    assert answers(page) == ["half an ans", "the second answer"]

    page.unroute("**/v1/grouped_completions")
    page.route("**/v1/grouped_completions", lambda route: route.abort("connectionreset"))
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_role("button", name="Ask")).to_be_enabled()
    assert "connection to the server dropped" in error_text(page)
    expect(page.get_by_label("Document")).to_have_value(PASSAGE)


def test_stop_ends_a_run_that_has_not_answered(page, start_server):
    """A server that never answers (page.route holds the request): Stop gives the page back."""
    held = []
    page.route("**/v1/grouped_completions", lambda route: held.append(route))
    open_playground(page, start_server())
    type_request(page, PASSAGE, QUESTIONS[:1])
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_role("button", name="Ask")).to_be_disabled()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_have_text("Stopped. The text that arrived is kept.")
    expect(page.get_by_role("button", name="Ask")).to_be_enabled()
    expect(page.get_by_role("alert")).to_be_empty()
    assert len(held) == 1
