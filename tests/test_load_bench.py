"""bench/load.py and bench/compare.py: the request patterns of each scenario (on the real app with
the tiny model, and on mock servers where timing must be exact), the report figures from known
timings, failures counted, the JSON keys, and llama.cpp's `timings.cache_n`."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import httpx
import pytest

from bench import compare, load
from bench.load import RequestRecord
from server.prompts import ANSWER_SYSTEM_PROMPT

SUMMARY_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    *(f"{stat}_{name}_ms" for stat in ("mean", "median", "p99", "std")
      for name in ("ttft", "tpot", "itl", "e2el")),
    "prompt_tokens_billed", "prompt_tokens_computed", "computed_share", "em", "f1",
}
RECORD_KEYS = {
    "kind", "passage", "question_id", "gold_answers", "group_id", "sent_s", "first_token_s",
    "chunk_s", "end_s", "prompt_tokens", "completion_tokens", "cached_tokens", "text",
    "finish_reason", "error", "replica",
}


def run(url: str, *flags: str) -> dict:
    return load.run_load(load.parse_args(["--url", url, "--max-tokens", "4", *flags]))


def by_passage(records: list[dict]) -> dict[int, list[dict]]:
    grouped = defaultdict(list)
    for record in records:
        grouped[record["passage"]].append(record)
    return grouped


# --- plans ---


def test_burst_plan_asks_every_question_of_the_passages_at_once():
    passages = load.passage_questions(3, 2)
    plan = load.plan_burst(passages, 7)
    assert [spec.passage for spec in plan] == [3] * 5 + [4] * 5
    assert {(spec.at_s, spec.after, spec.max_tokens, spec.kind) for spec in plan} == {
        (0.0, None, 7, "question")}
    first = plan[0]
    assert first.messages == [
        {"role": "system", "content": ANSWER_SYSTEM_PROMPT},
        {"role": "user", "content": f"Passage:\n{first.question.context}\n\n"
                                    f"Question: {first.question.question}"},
    ]


def test_trickle_plan_chains_each_passages_questions():
    plan = load.plan_trickle(load.passage_questions(0, 2), 4)
    assert [spec.after for spec in plan] == [None, 0, 1, 2, 3, None, 5, 6, 7, 8]
    assert all(plan[spec.after].passage == spec.passage for spec in plan if spec.after is not None)


def test_mixed_plan_starts_the_long_generations_first_and_asks_after_the_delay():
    args = load.parse_args(["--url", "u", "--scenario", "mixed", "--contexts", "2",
                            "--context-offset", "5", "--long", "2", "--delay", "0.5"])
    plan = load.build_plan(args)
    longs, questions = plan[:2], plan[2:]
    assert [(s.kind, s.passage, s.at_s, s.max_tokens) for s in longs] == [
        ("long", -1, 0.0, 256), ("long", -1, 0.0, 256)]  # on no passage
    assert longs[0].messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": load.LONG_REQUEST},
    ]
    assert {(s.kind, s.at_s) for s in questions} == {("question", 0.5)}
    assert sorted({s.passage for s in questions}) == [5, 6] and len(questions) == 10
    assert load.passages_used(args) == 2  # the questions' passages only
    # the long generations read no passage, so the last passages may hold questions
    last = load.parse_args(["--url", "u", "--scenario", "mixed", "--contexts", "2",
                            "--context-offset", str(load.shipped_passages() - 2), "--long", "3"])
    assert load.passages_used(last) == 2


def test_rate_arrivals_are_seeded_gamma_gaps():
    times = load.arrival_times(2000, 4.0, 1.0, seed=0)
    assert times == load.arrival_times(2000, 4.0, 1.0, seed=0)
    assert times != load.arrival_times(2000, 4.0, 1.0, seed=1)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert times[0] == 0.0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.08)  # mean gap 1 / rate
    bursty = load.arrival_times(2000, 4.0, 0.25, seed=0)
    bursty_gaps = [later - earlier for earlier, later in zip(bursty, bursty[1:])]
    assert sum(bursty_gaps) / len(bursty_gaps) == pytest.approx(0.25, rel=0.2)
    assert sorted(bursty_gaps)[1000] < sorted(gaps)[1000]  # same mean, more tiny gaps
    args = load.parse_args(["--url", "u", "--scenario", "rate", "--num-requests", "7",
                            "--request-rate", "2", "--context-offset", "1"])
    plan = load.build_plan(args)
    assert [spec.passage for spec in plan] == [1] * 5 + [2] * 2
    assert [spec.at_s for spec in plan] == load.arrival_times(7, 2.0, 1.0, seed=0)


# --- the scenarios on the real app (tiny model) ---


def test_trickle_never_has_two_questions_of_a_passage_in_flight(start_server):
    server = start_server(max_wait_ms=5.0)
    result = run(server.url, "--scenario", "trickle", "--contexts", "2", "--rounds", "2",
                 "--group-hints")
    assert len(result["rounds"]) == 2
    plan_ids = [[q.id for q in qs] for qs in load.passage_questions(0, 2)]
    for round_ in result["rounds"]:
        records = round_["requests"]
        assert round_["summary"]["completed"] == 10 and round_["summary"]["failed"] == 0
        first_end = min(r["end_s"] for r in records)
        for passage, asked in sorted(by_passage(records).items()):
            asked.sort(key=lambda r: r["sent_s"])
            assert [r["question_id"] for r in asked] == plan_ids[passage]
            for earlier, later in zip(asked, asked[1:]):
                assert earlier["end_s"] <= later["sent_s"]
            assert asked[0]["sent_s"] < first_end  # the passages run in parallel
    ids = [{r["group_id"] for r in round_["requests"]} for round_ in result["rounds"]]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]  # per passage and round


def test_burst_sends_everything_before_any_answer_and_writes_the_json(start_server, tmp_path,
                                                                      capsys):
    server = start_server(max_wait_ms=5.0)
    path = tmp_path / "load.json"
    argv = ["--url", f"{server.url}/v1", "--scenario", "burst", "--contexts", "2",
            "--max-tokens", "4", "--json", str(path)]
    assert load.main(argv) == 0
    result = json.loads(path.read_text())
    (round_,) = result["rounds"]
    records = round_["requests"]
    assert len(records) == 10 and {r["error"] for r in records} == {None}
    assert max(r["sent_s"] for r in records) < min(r["end_s"] for r in records)
    assert max(r["sent_s"] for r in records) - min(r["sent_s"] for r in records) < 0.2
    summary = round_["summary"]
    assert set(summary) == SUMMARY_KEYS and set(records[0]) == RECORD_KEYS
    assert summary["completed"] == 10
    assert summary["total_output_tokens"] == sum(r["completion_tokens"] for r in records) <= 40
    assert summary["total_input_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert summary["prompt_tokens_computed"] == (
        summary["total_input_tokens"] - sum(r["cached_tokens"] for r in records))
    assert {"url", "scenario", "model", "rounds", "passages", "max_tokens", "group_hints"} <= set(
        result["config"])
    assert result["config"]["model"] == "tiny-random" and result["config"]["passages"] == [0, 1]
    out = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in out
    assert "---------------Time to First Token----------------" in out
    assert f"{'Successful requests:':<40} {'10':<10}" in out


def test_mixed_sends_the_long_generation_first_and_reports_it_apart(start_server):
    server = start_server(max_wait_ms=5.0)
    result = run(server.url, "--scenario", "mixed", "--contexts", "1", "--long-tokens", "8",
                 "--delay", "0.2")
    (round_,) = result["rounds"]
    assert "summary" not in round_
    assert set(round_["questions"]) == set(round_["long"]) == SUMMARY_KEYS
    records = round_["requests"]
    (long,) = [r for r in records if r["kind"] == "long"]
    questions = [r for r in records if r["kind"] == "question"]
    assert long["passage"] == -1 and long["sent_s"] < 0.2 and 1 <= long["completion_tokens"] <= 8
    assert len(questions) == 5 and min(r["sent_s"] for r in questions) >= 0.2
    assert round_["questions"]["completed"] == 5 and round_["long"]["completed"] == 1
    assert round_["long"]["total_output_tokens"] == long["completion_tokens"]
    assert round_["long"]["f1"] is None
    assert round_["questions"]["f1"] is not None
    assert load.question_summary(round_) is round_["questions"]
    report = load.format_result(result)
    assert "mixed, round 1 of 1, model tiny-random: questions" in report
    assert "long generations" in report


# --- mock servers: exact timing, failures, hints, llama.cpp's fields ---


def sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def answer_events(text: str, usage: dict | None, timings: dict | None = None) -> list[dict]:
    """A stream as llama.cpp's server sends it: text, a finish chunk (with `timings`), usage."""
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if timings:
        finish["timings"] = timings
    halves = [text[: len(text) // 2], text[len(text) // 2 :]]
    events = [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in halves]
    return events + [finish] + ([{"choices": [], "usage": usage}] if usage else [])


class MockServer:
    """An OpenAI-style server in process: answers question number i of the passages by
    `behaviour(i)`, after `delay_s`, and records every request it saw. Of the 300 prompt tokens
    of an answer, llama.cpp-style `timings` say `cache_n` came from a cache."""

    def __init__(self, behaviour=lambda index: "ok", delay_s: float = 0.0, offset: int = 0,
                 cache_n: int = 240):
        questions = [q for qs in load.passage_questions(offset, 2) for q in qs]
        self.index_of = {q.question: i for i, q in enumerate(questions)}
        self.gold_of = {q.question: q.answers[0] for q in questions}
        self.behaviour, self.delay_s, self.cache_n = behaviour, delay_s, cache_n
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "mock-model"}]})
        self.requests.append(request)
        body = json.loads(request.content)
        question = body["messages"][-1]["content"].rpartition("Question: ")[2]
        await asyncio.sleep(self.delay_s)
        return self.reply(self.behaviour(self.index_of.get(question, -1)),
                          self.gold_of.get(question, "hello"))

    def reply(self, behaviour: str, gold: str) -> httpx.Response:
        usage = {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302}
        headers = {"content-type": "text/event-stream"}
        if behaviour == "500":
            error = {"error": {"message": "engine failed", "type": "server_error"}}
            return httpx.Response(500, json=error)
        if behaviour == "disconnect":
            raise httpx.ConnectError("connection refused")
        if behaviour == "error-event":
            events = answer_events("halfhalf", None)[:1] + [{"error": {"message": "engine broke"}}]
        elif behaviour == "no-usage":
            events = answer_events("no usage", None)
        else:
            events = answer_events(f"<answer>{gold}</answer>", usage,
                                   timings={"cache_n": self.cache_n,
                                            "prompt_n": 300 - self.cache_n})
        return httpx.Response(200, content=sse(*events), headers=headers)


def run_mock(server: MockServer, *flags: str) -> dict:
    args = load.parse_args(["--url", "http://mock", "--no-warmup", *flags])
    return load.run_load(args, transport=server.transport)


def test_failed_requests_are_counted_and_the_run_completes(tmp_path, capsys):
    behaviours = ["ok", "500", "error-event", "no-usage", "disconnect"]
    server = MockServer(lambda index: behaviours[index % 5])
    path = tmp_path / "load.json"
    argv = ["--url", "http://mock", "--scenario", "burst", "--contexts", "2", "--json",
            str(path)]
    assert load.main(argv, transport=server.transport) == 0
    (round_,) = json.loads(path.read_text())["rounds"]
    summary, records = round_["summary"], round_["requests"]
    assert summary["completed"] == 2 and summary["failed"] == 8 and len(records) == 10
    errors = [r["error"] for r in records]
    assert errors[0] is None and errors[5] is None
    assert "answered 500: engine failed" in errors[1]
    assert "error in the stream: engine broke" in errors[2] and records[2]["text"] == "half"
    assert "no usage" in errors[3]
    assert "ConnectError" in errors[4]
    assert summary["total_input_tokens"] == 600  # successful requests only
    assert "Failed requests:                         8" in capsys.readouterr().out


def test_llama_cpp_cache_n_is_read_when_usage_has_no_cached_tokens():
    timings = {"cache_n": 240, "prompt_n": 60}
    assert load.usage_tokens({"prompt_tokens": 300, "completion_tokens": 7}, timings) == (
        300, 7, 240)
    with_details = {"prompt_tokens": 300, "completion_tokens": 7,
                    "prompt_tokens_details": {"cached_tokens": 10}}
    assert load.usage_tokens(with_details, timings) == (300, 7, 10)  # the usage wins
    assert load.usage_tokens({"completion_tokens": 7}, timings) == (300, 7, 240)
    assert load.usage_tokens({"prompt_tokens": 300, "completion_tokens": 7}) == (300, 7, 0)
    result = run_mock(MockServer(), "--scenario", "burst", "--contexts", "1")
    summary = result["rounds"][0]["summary"]
    assert summary["prompt_tokens_billed"] == 1500 and summary["prompt_tokens_computed"] == 300
    assert summary["computed_share"] == pytest.approx(0.2)
    assert summary["em"] == summary["f1"] == 1.0  # the mock answers with the gold answer


def test_rate_sends_on_schedule_while_earlier_requests_still_run():
    server = MockServer(delay_s=0.4)
    flags = ["--scenario", "rate", "--num-requests", "6", "--request-rate", "20", "--seed", "3"]
    result = run_mock(server, *flags)
    planned = [spec.at_s for spec in load.build_plan(load.parse_args(["--url", "u", *flags]))]
    records = result["rounds"][0]["requests"]
    sent = [r["sent_s"] for r in records]
    assert sent == pytest.approx(planned, abs=0.05)
    sent_gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert sent_gaps == pytest.approx([b - a for a, b in zip(planned, planned[1:])], abs=0.05)
    assert max(sent) < min(r["end_s"] for r in records)  # open loop: nobody waited for answers
    assert result["config"]["seed"] == 3 and result["config"]["request_rate"] == 20.0


def test_group_hints_go_in_body_and_header_new_per_round_and_the_key_stays_out_of_the_json(
        tmp_path):
    server = MockServer()
    path = tmp_path / "load.json"
    argv = ["--url", "http://mock/v1", "--scenario", "trickle", "--contexts", "2", "--rounds",
            "2", "--group-hints", "--api-key", "secret-key", "--json", str(path)]
    assert load.main(argv, transport=server.transport) == 0
    sent = [(json.loads(r.content), r.headers) for r in server.requests]
    warmup, asked = sent[0], sent[1:]
    assert "group_id" not in warmup[0] and "x-group-id" not in warmup[1]
    assert len(asked) == 20
    for body, headers in asked:
        assert headers["x-group-id"] == body["group_id"]
        assert headers["authorization"] == "Bearer secret-key"
        assert body["model"] == "mock-model" and body["temperature"] == 0.0
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 96
    ids = {body["group_id"] for body, _ in asked}
    assert len(ids) == 4 and all("-r1-p" in i or "-r2-p" in i for i in ids)
    assert "secret-key" not in path.read_text()
    plain = MockServer()
    run_mock(plain, "--scenario", "burst", "--contexts", "1")
    assert all("group_id" not in json.loads(r.content) and "x-group-id" not in r.headers
               for r in plain.requests)


# --- the summary from known timings ---


def record(sent: float, first: float | None, chunks: list[float], end: float, completion: int,
           prompt: int = 100, cached: int = 0, text: str = "", error: str | None = None,
           kind: str = "question") -> RequestRecord:
    return RequestRecord(kind, 0, "q", ["blue sky"], None, sent, first, chunks, end, prompt,
                         completion, cached, text, "stop", error)


def test_summary_figures_from_known_timings():
    records = [
        record(0.0, 0.1, [0.2, 0.4], 0.5, 3, prompt=100, cached=40,
               text="<answer>blue sky</answer>"),
        record(0.5, 0.8, [], 1.0, 1, prompt=50, text="blue"),
        record(0.2, None, [], 1.5, 0, prompt=0, error="boom"),
    ]
    s = load.summarize(records)
    approx = pytest.approx
    assert (s["completed"], s["failed"], s["duration"]) == (2, 1, approx(1.5))
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (150, 4)
    assert s["request_throughput"] == approx(2 / 1.5)
    assert s["output_throughput"] == approx(4 / 1.5)
    assert s["total_token_throughput"] == approx(154 / 1.5)
    # TTFT 100 and 300 ms
    assert s["mean_ttft_ms"] == approx(200) and s["median_ttft_ms"] == approx(200)
    assert s["p99_ttft_ms"] == approx(298) and s["std_ttft_ms"] == approx(100)
    # TPOT: only the 3-token answer, (0.5 - 0.1) / 2
    assert s["mean_tpot_ms"] == approx(200) and s["p99_tpot_ms"] == approx(200)
    assert s["std_tpot_ms"] == approx(0)
    # ITL: the gaps 100 and 200 ms of the first answer
    assert s["mean_itl_ms"] == approx(150) and s["median_itl_ms"] == approx(150)
    assert s["p99_itl_ms"] == approx(199)
    assert s["mean_e2el_ms"] == approx(500) and s["p99_e2el_ms"] == approx(500)
    assert (s["prompt_tokens_billed"], s["prompt_tokens_computed"]) == (150, 110)
    assert s["computed_share"] == approx(110 / 150)
    assert s["em"] == approx(0.5)  # the untagged answer scores no EM
    assert s["f1"] == approx((1 + 2 / 3) / 2)  # "blue" against "blue sky"
    report = load.format_report(s)
    assert f"{'Mean TTFT (ms):':<40} {'200.00':<10}" in report
    assert f"{'P99 ITL (ms):':<40} {'199.00':<10}" in report
    assert f"{'Computed share:':<40} {'0.733':<10}" in report
    assert report.endswith("=" * 50)


def test_summary_of_nothing_but_failures_has_no_figures():
    s = load.summarize([record(0.0, None, [], 2.0, 0, error="refused")])
    assert (s["completed"], s["failed"], s["duration"]) == (0, 1, 2.0)
    assert s["request_throughput"] == 0.0 and s["mean_ttft_ms"] is None
    assert s["computed_share"] is None and s["f1"] is None
    assert "Mean TTFT (ms):                          -" in load.format_report(s)


@pytest.mark.parametrize("flags", [
    ["--scenario", "rate"],  # no --request-rate
    ["--scenario", "rate", "--request-rate", "inf"],
    ["--scenario", "burst", "--context-offset", "-1"],
    ["--scenario", "burst", "--contexts", "0"],
    ["--scenario", "wave"],
    ["--scenario", "burst", "--contexts", "5", "--context-offset", "96"],  # 100 shipped
    ["--scenario", "rate", "--request-rate", "1", "--num-requests", "501"],
])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        load.parse_args(["--url", "u", *flags])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


# --- compare ---


def test_compare_cases_read_distinct_passages_and_hint_our_server_only():
    offsets = compare.case_offsets()
    spans = []
    for case in compare.CASES:
        args = compare.load_args(case, "u", offsets[case.name], hints=False, common=[])
        spans.append(range(offsets[case.name], offsets[case.name] + load.passages_used(args)))
    covered = [index for span in spans for index in span]
    assert len(covered) == len(set(covered)) and max(covered) < 100
    burst = compare.CASES[0]
    assert compare.load_args(burst, "u", 0, hints=True, common=[]).group_hints
    nohints = next(case for case in compare.CASES if case.name == "burst-nohints")
    assert not nohints.hints
    mixed = next(case for case in compare.CASES if case.name == "mixed")
    mixed_args = compare.load_args(mixed, "u", 0, hints=False, common=["--max-tokens", "9"])
    assert len(load.build_plan(mixed_args)) == 21 and mixed_args.max_tokens == 9
    trickle = next(case for case in compare.CASES if case.name == "trickle")
    trickle_args = compare.load_args(trickle, "u", 0, hints=False, common=[])
    assert (trickle_args.contexts, trickle_args.rounds, len(load.build_plan(trickle_args))) == (
        8, 2, 40)
    assert offsets == {"burst": 0, "burst-nohints": 8, "trickle": 16, "mixed": 24, "rate": 28}


def test_compare_table_puts_both_servers_and_their_ratio_side_by_side():
    fast = load.summarize([record(0.0, 0.1, [], 0.5, 1, prompt=100, cached=50)])
    slow = load.summarize([record(0.0, 0.2, [], 1.0, 1, prompt=100)])
    trickle = next(case for case in compare.CASES if case.name == "trickle")
    results = {"ours": {"rounds": [{"summary": fast}, {"summary": fast}]},
               "llama.cpp": {"rounds": [{"summary": slow}, {"summary": slow}]}}
    rows = compare.comparison_rows(trickle, results)
    assert {row["scenario"] for row in rows} == {"trickle", "trickle (seen again)"}
    assert set(rows[0]) == {"scenario", "figure", "key", "ours", "llama.cpp", "ours/llama.cpp"}
    table = compare.format_table(rows, ["ours", "llama.cpp"])
    assert table.splitlines()[1] == "|---|---|--:|--:|--:|"
    assert "| scenario | figure | ours | llama.cpp | ours/llama.cpp |" in table
    assert "| trickle | Request throughput (req/s) | 2.00 | 1.00 | 2.00 |" in table
    assert "| trickle (seen again) | TTFT p50 (ms) | 100.0 | 200.0 | 0.50 |" in table
    assert "| trickle | Computed share | 0.500 | 1.000 | 0.50 |" in table
    assert "| trickle | Failed requests | 0 | 0 | - |" in table


def test_compare_table_with_an_earlier_build_has_a_ratio_column_per_other_target():
    fast = load.summarize([record(0.0, 0.1, [], 0.5, 1, prompt=100, cached=50)])
    middle = load.summarize([record(0.0, 0.4, [], 0.8, 1, prompt=100, cached=25)])
    slow = load.summarize([record(0.0, 0.2, [], 1.0, 1, prompt=100)])
    burst = compare.CASES[0]
    results = {"ours": {"rounds": [{"summary": fast}]},
               "before": {"rounds": [{"summary": middle}]},
               "llama.cpp": {"rounds": [{"summary": slow}]}}
    rows = compare.comparison_rows(burst, results)
    assert rows[0]["ours/before"] == pytest.approx(1.6)
    assert rows[0]["ours/llama.cpp"] == pytest.approx(2.0)
    lines = compare.format_table(rows, ["ours", "before", "llama.cpp"]).splitlines()
    assert lines[:2] == [
        "| scenario | figure | ours | before | llama.cpp | ours/before | ours/llama.cpp |",
        "|---|---|--:|--:|--:|--:|--:|"]
    assert "| burst | Request throughput (req/s) | 2.00 | 1.25 | 1.00 | 1.60 | 2.00 |" in lines
    assert "| burst | TTFT p50 (ms) | 100.0 | 400.0 | 200.0 | 0.25 | 0.50 |" in lines
    assert "| burst | Computed share | 0.500 | 0.750 | 1.000 | 0.67 | 0.50 |" in lines
    assert "| burst | Failed requests | 0 | 0 | 0 | - | - |" in lines


def passage_of_prompt(request: httpx.Request) -> int | None:
    """The selection index of the passage a question request asks about (None: the warm-up)."""
    content = json.loads(request.content)["messages"][-1]["content"]
    if not content.startswith("Passage:"):
        return None
    prompts = {f"Passage:\n{q.context}\n\nQuestion: {q.question}": q.context_index
               for qs in load.passage_questions(0, 24) for q in qs}
    return prompts[content]


@pytest.mark.parametrize("before", [True, False])
def test_compare_runs_each_scenario_on_every_target_in_turn(before, tmp_path, capsys):
    servers = {"ours": MockServer(cache_n=240), "before": MockServer(cache_n=180),
               "llama.cpp": MockServer(cache_n=60)}  # computed shares 0.2, 0.4, 0.8
    if not before:
        del servers["before"]
    path = tmp_path / "compare.json"
    argv = ["--ours", "http://ours/", "--peer", "http://peer", "--scenarios",
            "burst-nohints,trickle", "--max-tokens", "4", "--json", str(path),
            *(["--before", "http://before/"] if before else [])]
    transports = {name: server.transport for name, server in servers.items()}
    assert compare.main(argv, transports=transports) == 0
    names = list(servers)
    out, err = capsys.readouterr()
    announced = [line for line in err.splitlines() if " on " in line]
    assert announced == [f"{case} on {name}" for case in ("burst-nohints", "trickle")
                         for name in names]
    for name, server in servers.items():
        asked = [(passage_of_prompt(r), json.loads(r.content).get("group_id"))
                 for r in server.requests]
        questions = [(passage, hint) for passage, hint in asked if passage is not None]
        assert len(questions) == 40 + 80  # burst-nohints, then trickle's 2 rounds
        nohints, trickle = questions[:40], questions[40:]
        assert sorted({passage for passage, _ in nohints}) == list(range(8, 16))
        assert sorted({passage for passage, _ in trickle}) == list(range(16, 24))
        assert {hint for _, hint in nohints} == {None}
        hinted = {hint is not None for _, hint in trickle}
        assert hinted == ({False} if name == "llama.cpp" else {True})  # our builds only

    result = json.loads(path.read_text())
    assert result["config"]["urls"] == {
        "ours": "http://ours", **({"before": "http://before"} if before else {}),
        "llama.cpp": "http://peer"}
    assert [run["scenario"] for run in result["runs"]] == ["burst-nohints", "trickle"]
    for run in result["runs"]:
        assert set(run) == {"scenario", *names}
        assert {run[name]["config"]["url"] for name in names} == set(
            result["config"]["urls"].values())
    assert len(result["runs"][1]["before" if before else "ours"]["rounds"]) == 2
    assert len(result["rows"]) == 3 * len(compare.FIGURES)  # burst-nohints, trickle x 2 rounds

    lines = out.splitlines()
    if before:
        assert lines[0] == ("| scenario | figure | ours | before | llama.cpp | ours/before "
                            "| ours/llama.cpp |")
        assert "| trickle (seen again) | Computed share | 0.200 | 0.400 | 0.800 | 0.50 | 0.25 |" \
            in lines
        assert "| burst-nohints | Failed requests | 0 | 0 | 0 | - | - |" in lines
        assert "| trickle (seen again) | Failed requests | 0 | 0 | 0 | - | - |" in lines
    else:  # the table of a run without --before, as it always was
        assert lines[0] == "| scenario | figure | ours | llama.cpp | ours/llama.cpp |"
        assert "| trickle (seen again) | Computed share | 0.200 | 0.800 | 0.25 |" in lines
        assert "| burst-nohints | Failed requests | 0 | 0 | - |" in lines
