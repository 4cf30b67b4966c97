"""bench/run_squad.py against a fake OpenAI-compatible server with known answers and usage.

The fake answers question number i of the selection (flat, context-major) by i % 4:
  0 -> "<answer>{gold}</answer>"   EM 1, F1 1, lenient 1, tags
  1 -> "<answer>zzzz qqqq</answer>" EM 0, F1 0, lenient 0, tags
  2 -> "{gold}" (no tags)           EM 0, F1 1, lenient 1  (F1 reads the raw text)
  3 -> "<answer></answer>"          EM 0, F1 0, lenient 0, tags
and bills prompt_tokens = PREFIX + len(question); within a group every member but the first
reports PREFIX cached tokens (a foreign server with no cached_tokens: computed = billed). A chat
request on no passage (the warm-up) is answered "Hello".
"""

import asyncio
import json
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import run_squad
from bench.squad import exact_match, f1_score, load_selection, make_groups, score_answer

PREFIX = 100
OPENAI_CHAT_FIELDS = {"model", "messages", "max_tokens", "temperature", "stream", "stream_options"}
WARMUP_USAGE = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}


def expected_text(index: int, gold: str) -> str:
    return [f"<answer>{gold}</answer>", "<answer>zzzz qqqq</answer>", gold, "<answer></answer>"][
        index % 4
    ]


class FakeServer:
    """Records what it was sent; `openai_only` rejects any non-OpenAI field, like a strict
    foreign server, and reports no cached tokens."""

    def __init__(self, contexts: int, openai_only: bool = False, api_key: str | None = None):
        selection = load_selection(contexts)
        flat = [(c["context"], q) for c in selection for q in c["questions"]]
        self.by_id = {q["id"]: (i, q) for i, (_, q) in enumerate(flat)}
        self.by_prompt = {(ctx, q["question"]): (i, q) for i, (ctx, q) in enumerate(flat)}
        self.openai_only, self.api_key = openai_only, api_key
        self.grouped_bodies, self.chat_bodies, self.chat_header_ids = [], [], []
        self.warmup_bodies, self.arrivals = [], []  # arrivals: every request's text, in order
        self.in_flight, self.most_in_flight = Counter(), Counter()
        self.groups_seen = set()
        self.app = self._make_app()

    def answer(self, index: int, question: dict, cached: int | None) -> tuple[str, dict]:
        text = expected_text(index, question["answers"][0])
        usage = {"prompt_tokens": PREFIX + len(question["question"]),
                 "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return text, usage

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return error(401, "bad key")
            return await call_next(request)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.post("/v1/grouped_completions")
        async def grouped(request: Request):
            body = await request.json()
            self.grouped_bodies.append(body)
            self.arrivals.append(body["context"] + "".join(q["question"]
                                                           for q in body["questions"]))
            await asyncio.sleep(0.005)
            answers = []
            for position, item in enumerate(body["questions"]):
                index, question = self.by_id[item["id"]]
                assert question["question"] == item["question"]
                text, usage = self.answer(index, question, 0 if position == 0 else PREFIX)
                answers.append({"index": position, "id": item["id"], "text": text,
                                "answer": None, "finish_reason": "stop", "usage": usage})
            return {"object": "grouped_completion", "answers": answers}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            unknown = set(body) - OPENAI_CHAT_FIELDS
            if self.openai_only and unknown:
                return error(400, f"Unrecognized request arguments: {sorted(unknown)}")
            self.arrivals.append("".join(m["content"] for m in body["messages"]))
            if "\n\nQuestion: " not in body["messages"][-1]["content"]:
                self.warmup_bodies.append(body)
                return {"choices": [{"index": 0, "finish_reason": "length",
                                     "message": {"role": "assistant", "content": "Hello"}}],
                        "usage": WARMUP_USAGE}
            self.chat_bodies.append(body)
            self.chat_header_ids.append(request.headers.get("x-group-id"))
            context, question = body["messages"][1]["content"].split("\n\nQuestion: ")
            index, item = self.by_prompt[(context.removeprefix("Passage:\n"), question)]
            group = body.get("group_id")
            cached = None if self.openai_only else (PREFIX if group in self.groups_seen else 0)
            self.groups_seen.add(group)
            text, usage = self.answer(index, item, cached)
            self.in_flight[group] += 1
            self.most_in_flight[group] = max(self.most_in_flight[group], self.in_flight[group])
            await asyncio.sleep(0.02)  # the group's other requests arrive meanwhile
            self.in_flight[group] -= 1
            return StreamingResponse(sse(text, usage), media_type="text/event-stream")

        return app


def error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": None}}
    return JSONResponse(body, status_code=status)


async def sse(text: str, usage: dict):
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for piece in [text[: len(text) // 2], text[len(text) // 2 :]]:
        yield event({"choices": [{"index": 0, "delta": {"content": piece}}]})
    yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    yield event({"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def run(server: FakeServer, tmp_path, *flags: str) -> dict:
    path = tmp_path / "out.json"
    argv = ["--url", "http://fake/v1", "--json", str(path), *flags]
    assert run_squad.main(argv, transport=httpx.ASGITransport(app=server.app)) == 0
    return json.loads(path.read_text())


def expected_scores(indices: list[int]) -> dict:
    cases = Counter(i % 4 for i in indices)
    n = len(indices)
    return {"em": cases[0] / n, "f1": (cases[0] + cases[2]) / n,
            "lenient": (cases[0] + cases[2]) / n, "tag_rate": (n - cases[2]) / n}


def flat_questions(contexts: int) -> list[dict]:
    return [q for c in load_selection(contexts) for q in c["questions"]]


def test_grouped_mode_reports_known_scores_and_usage(tmp_path, capsys):
    server = FakeServer(contexts=3)
    result = run(server, tmp_path, "--contexts", "3", "--group-sizes", "1,2,5")
    questions = flat_questions(3)
    billed = sum(PREFIX + len(q["question"]) for q in questions)
    for run_, size, num_groups in zip(result["runs"], [1, 2, 5], [15, 9, 3]):
        summary = run_["summary"]
        assert summary["group_size"] == size and summary["num_groups"] == num_groups
        assert summary["num_questions"] == 15 == summary["finish_reasons"]["stop"]
        for key, value in expected_scores(list(range(15))).items():
            assert summary[key] == pytest.approx(value), key
        assert summary["prompt_tokens_billed"] == billed
        assert summary["prompt_tokens_computed"] == billed - PREFIX * (15 - num_groups)
        generated = sum(len(expected_text(i, q["answers"][0]).split())
                        for i, q in enumerate(questions))
        assert summary["completion_tokens"] == generated
        assert summary["cost_billed_usd"] == pytest.approx((billed * 0.10 + generated * 0.20) / 1e6)
        assert summary["ttft_mean_s"] is None  # no streaming in grouped mode
        assert [q["id"] for q in run_["questions"]] == [q["id"] for q in questions]
    # one request per group, each with the research prompt settings
    assert len(server.grouped_bodies) == 15 + 9 + 3
    assert {b["max_tokens"] for b in server.grouped_bodies} == {96}
    assert {b["temperature"] for b in server.grouped_bodies} == {0.0}
    out = capsys.readouterr().out
    assert "| G (group size) | 1 | 2 | 5 |" in out
    assert f"| Prompt tokens, API-billed | {billed:,} | {billed:,} | {billed:,} |" in out
    assert "| EM | 0.267 | 0.267 | 0.267 |" in out  # questions 0, 4, 8, 12 of 15


def test_json_scores_agree_with_the_per_question_answers(tmp_path):
    result = run(FakeServer(contexts=2), tmp_path, "--contexts", "2", "--group-sizes", "3")
    (run_,) = result["runs"]
    for record in run_["questions"]:
        prediction = record["answer"] if record["has_tags"] else record["text"].strip()
        assert record["answer"] == score_answer(record["text"], record["gold_answers"])["answer"]
        golds = record["gold_answers"]
        em = max(exact_match(prediction, gold) for gold in golds)
        assert record["em"] == (em if record["has_tags"] else 0.0)
        assert record["f1"] == max(f1_score(prediction, gold) for gold in golds)
        assert record["usage"]["computed_prompt_tokens"] == (
            record["usage"]["prompt_tokens"] - record["usage"]["cached_tokens"])
    records = run_["questions"]
    assert run_["summary"]["em"] == pytest.approx(sum(r["em"] for r in records) / len(records))
    assert run_["summary"]["f1"] == pytest.approx(sum(r["f1"] for r in records) / len(records))
    assert result["config"]["group_sizes"] == [3] and "api_key" not in result["config"]


def test_chat_mode_sends_a_group_together_under_one_group_id(tmp_path):
    server = FakeServer(contexts=2)
    result = run(server, tmp_path, "--contexts", "2", "--group-sizes", "5,2", "--mode", "chat")
    assert result["config"]["model"] == "fake-model"  # from /v1/models
    assert {b["model"] for b in server.chat_bodies} == {"fake-model"}
    assert server.chat_header_ids == [b["group_id"] for b in server.chat_bodies]  # for routers
    asked = Counter(b["group_id"] for b in server.chat_bodies)
    groups = {5: make_groups(load_selection(2), 5), 2: make_groups(load_selection(2), 2)}
    assert sorted(asked.values()) == sorted(
        len(g.questions) for plan in groups.values() for g in plan)
    for group_id, count in asked.items():
        assert server.most_in_flight[group_id] == count  # all of a group in flight at once
    for run_, num_groups in zip(result["runs"], [2, 6]):
        summary = run_["summary"]
        assert summary["prompt_tokens_computed"] == (
            summary["prompt_tokens_billed"] - PREFIX * (10 - num_groups))
        assert summary["ttft_mean_s"] is not None and summary["num_requests"] == 10


def test_no_hints_works_against_a_plain_openai_server(tmp_path):
    server = FakeServer(contexts=1, openai_only=True)
    result = run(server, tmp_path, "--contexts", "1", "--group-sizes", "5",
                 "--mode", "chat", "--no-hints", "--model", "other-engine")
    assert all(set(b) <= OPENAI_CHAT_FIELDS for b in server.chat_bodies + server.warmup_bodies)
    assert set(server.chat_header_ids) == {None}
    assert {b["model"] for b in server.chat_bodies} == {"other-engine"}
    summary = result["runs"][0]["summary"]
    # no cached_tokens in a foreign server's usage: everything counts as computed
    assert summary["prompt_tokens_computed"] == summary["prompt_tokens_billed"] > 0
    assert summary["em"] == pytest.approx(expected_scores(list(range(5)))["em"])


def test_a_refused_request_ends_the_run_with_the_servers_message(tmp_path, capsys):
    server = FakeServer(contexts=1, openai_only=True)
    argv = ["--url", "http://fake", "--contexts", "1", "--mode", "chat"]
    assert run_squad.main(argv, transport=httpx.ASGITransport(app=server.app)) == 1
    refusal = "answered 400: Unrecognized request arguments: ['cache_salt', 'group_id']"
    assert refusal in capsys.readouterr().err


def test_api_key_goes_as_a_bearer_token(tmp_path, capsys):
    server = FakeServer(contexts=1, api_key="secret")
    run(server, tmp_path, "--contexts", "1", "--group-sizes", "5", "--api-key", "secret")
    argv = ["--url", "http://fake", "--contexts", "1", "--group-sizes", "5"]
    assert run_squad.main(argv, transport=httpx.ASGITransport(app=server.app)) == 1
    assert "answered 401: bad key" in capsys.readouterr().err


def test_the_warm_up_comes_first_and_touches_no_passage(tmp_path):
    for mode in ("grouped", "chat"):
        server = FakeServer(contexts=2)
        run(server, tmp_path, "--contexts", "2", "--group-sizes", "1", "--mode", mode)
        warmup, *rest = server.arrivals
        assert len(server.warmup_bodies) == 1 and len(rest) == 10
        for context in load_selection(2):
            assert context["context"] not in warmup
            assert not any(q["question"] in warmup for q in context["questions"])


def salts_by_group(server: FakeServer, mode: str) -> dict[str, set[str]]:
    """cache_salt -> the question ids sent with it."""
    salts: dict[str, set[str]] = {}
    if mode == "grouped":
        for body in server.grouped_bodies:
            salts.setdefault(body["cache_salt"], set()).update(q["id"] for q in body["questions"])
    for body in server.chat_bodies:
        context, question = body["messages"][1]["content"].split("\n\nQuestion: ")
        _, item = server.by_prompt[(context.removeprefix("Passage:\n"), question)]
        salts.setdefault(body["cache_salt"], set()).add(item["id"])
    return salts


@pytest.mark.parametrize("mode", ["grouped", "chat"])
def test_each_group_shares_only_within_itself(tmp_path, mode):
    """One fresh cache_salt per group: no group finds what another left in a prefix cache."""
    server = FakeServer(contexts=2)
    result = run(server, tmp_path, "--contexts", "2", "--group-sizes", "1,5", "--mode", mode)
    groups = [set(g["question_ids"]) for run_ in result["runs"] for g in run_["groups"]]
    salts = salts_by_group(server, mode)
    assert sorted(map(sorted, salts.values())) == sorted(map(sorted, groups))
    assert len(salts) == 10 + 2
    assert result["config"]["cache_salt"] == "group"
    again = FakeServer(contexts=2)
    run(again, tmp_path, "--contexts", "2", "--group-sizes", "1,5", "--mode", mode)
    assert not set(salts) & set(salts_by_group(again, mode))  # a new run finds nothing either


def test_share_cache_gives_one_salt_per_group_size(tmp_path):
    server = FakeServer(contexts=2)
    result = run(server, tmp_path, "--contexts", "2", "--group-sizes", "1,5", "--share-cache")
    every_question = {q["id"] for q in flat_questions(2)}
    assert sorted(salts_by_group(server, "grouped").values(), key=len) == [every_question] * 2
    assert result["config"]["cache_salt"] == "group size"


def test_faithful_grouped_mode_sends_mixed_chunks_per_context(tmp_path):
    server = FakeServer(contexts=12)
    result = run(server, tmp_path, "--contexts", "12", "--faithful", "--group-sizes", "2")
    summary = result["runs"][0]["summary"]
    assert summary["num_questions"] == 60 and summary["num_groups"] == 30
    # context of 5 questions, chunks of 2: every other context boundary cuts a chunk in two
    mixed = [g for g in result["runs"][0]["groups"] if g["num_contexts"] == 2]
    assert len(mixed) == 6 and summary["num_requests"] == 36
    selection = load_selection(12)
    context_of = {q["id"]: c["context"] for c in selection for q in c["questions"]}
    for body in server.grouped_bodies:
        assert {context_of[q["id"]] for q in body["questions"]} == {body["context"]}


def test_plot_writes_a_png(tmp_path):
    plot = tmp_path / "bench.png"
    run(FakeServer(contexts=1), tmp_path, "--contexts", "1", "--group-sizes", "1,5",
        "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags", [
    ["--no-hints"],  # grouped mode has no hints to drop
    ["--mode", "chat", "--no-hints", "--share-cache"],  # no cache_salt to share
    ["--group-sizes", "0,2"],
    ["--group-sizes", "two"],
    ["--contexts", "0"],
    ["--faithful", "--contexts", "8"],
    ["--price-in", "-1"],
    ["--squad", "/no/such/file.json"],
])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_squad.parse_args(["--url", "http://fake", *flags])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_concurrency_below_a_groups_requests_is_refused():
    argv = ["--url", "http://fake", "--contexts", "1", "--mode", "chat", "--concurrency", "3"]
    with pytest.raises(SystemExit, match="--concurrency 5 or more"):
        run_squad.main(argv)
