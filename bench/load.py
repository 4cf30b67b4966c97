"""The load bench: traffic patterns of streamed chat requests against any OpenAI-compatible
server, reported as `vllm bench serve` reports them.

    python -m bench.load --url http://localhost:8000 --scenario burst --contexts 8 --group-hints
    python -m bench.load --url URL --scenario trickle --contexts 4 --rounds 2
    python -m bench.load --url URL --scenario mixed --contexts 4 --long 1 --delay 1
    python -m bench.load --url URL --scenario rate --num-requests 40 --request-rate 2
    python -m bench.load --url URL --scenario clients --clients 4 --hot-share 0.6 \
        --system-prompt-file bench/data/retrieval-system-prompt.txt

Every question is one streamed /v1/chat/completions request built as run_squad's chat mode
builds it (system prompt + `Passage: ... Question: ...`, temperature 0), from --contexts passages
of the shipped SQuAD selection starting at --context-offset. Scenarios:
  burst    all questions of the passages at once
  trickle  per passage its questions one after another; the passages in parallel
  mixed    --long long generations first, the questions all at once --delay seconds later
  rate     --num-requests questions at seeded gamma arrival times, --request-rate per second
  clients  the questions in a seeded shuffled order, dealt in turn to --clients users who each
           ask their next question when the answer to their last has arrived
--system-prompt-file gives every question another system prompt (the instructions an app sends
with each question); --hot-share moves questions of the other passages to the first passage
until it holds that share of them (asked about it, they have no gold answer and are not scored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from bench.cli import add_request_flags, base_url, positive
from bench.progress import Progress
from bench.report import percentile
from bench.squad import (
    QUESTIONS_PER_CONTEXT,
    SELECTION_FILE,
    Question,
    load_selection,
    make_groups,
    score_answer,
)
from bench.squad_http import (
    WARMUP_MESSAGES,
    ServerError,
    _cached_tokens,
    _raise_for_status,
    _sse_chunks,
    fetch_model_id,
)
from server.prompts import question_messages

SCENARIOS = ("burst", "trickle", "mixed", "rate", "clients")
LONG_SYSTEM_PROMPT = "You are a helpful assistant."


# A request whose answer is long by nature (measured: both servers write until max_tokens;
# asked to retell a passage, the embedded model stops after a few dozen tokens).
LONG_REQUEST = "Write the numbers from one to two hundred in words, separated by commas."


@dataclass(frozen=True)
class RequestSpec:
    """One request of a plan: what to ask and when. Plans are pure, so tests check a pattern
    without a server."""

    kind: str  # "question" (scored) or "long" (a long generation, mixed only)
    passage: int  # index of its passage in the shipped selection
    max_tokens: int
    question: Question | None = None  # kind "question"
    at_s: float = 0.0  # earliest send, seconds after the round starts
    after: int | None = None  # position in the plan of the request whose answer must arrive first
    system_prompt: str | None = None  # kind "question": None, the answer-in-tags prompt

    @property
    def messages(self) -> list[dict]:
        if self.question is not None:
            return question_messages(self.question.context, self.question.question,
                                     self.system_prompt)
        return [
            {"role": "system", "content": LONG_SYSTEM_PROMPT},
            {"role": "user", "content": LONG_REQUEST},
        ]


@dataclass
class RequestRecord:
    """What one request did, client-side: times in seconds since its round started."""

    kind: str
    passage: int
    question_id: str | None
    gold_answers: list[str]
    group_id: str | None
    sent_s: float = 0.0
    first_token_s: float | None = None  # first content chunk
    chunk_s: list[float] = field(default_factory=list)  # every later content chunk
    end_s: float = 0.0  # last byte (or the failure)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    replica: str | None = None  # the X-Groupwise-Replica header: which replica answered

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive content chunks."""
        times = [self.first_token_s, *self.chunk_s] if self.first_token_s is not None else []
        return [later - earlier for earlier, later in zip(times, times[1:])]


# --- plans: which requests, in which pattern ---


def passage_questions(offset: int, count: int) -> list[list[Question]]:
    """The questions of `count` passages of the shipped selection from `offset`, one list per
    passage; `context_index` is the passage's index in the whole selection."""
    selection = load_selection(offset + count)[offset:]
    return [
        [replace(q, context_index=offset + q.context_index) for q in group.questions]
        for group in make_groups(selection, QUESTIONS_PER_CONTEXT)
    ]


def _question_spec(question: Question, max_tokens: int, **timing) -> RequestSpec:
    return RequestSpec("question", question.context_index, max_tokens, question=question,
                       **timing)


def plan_burst(passages: list[list[Question]], max_tokens: int) -> list[RequestSpec]:
    """Everything at once: the best case for grouping, and a queue for everyone else."""
    return [_question_spec(q, max_tokens) for questions in passages for q in questions]


def plan_trickle(passages: list[list[Question]], max_tokens: int) -> list[RequestSpec]:
    """A user per passage asking one question after the other: never two of a passage in
    flight, so only a prefix cache (not grouping) can share the passage."""
    plan: list[RequestSpec] = []
    for questions in passages:
        previous = None
        for question in questions:
            plan.append(_question_spec(question, max_tokens, after=previous))
            previous = len(plan) - 1
    return plan


def plan_mixed(passages: list[list[Question]], num_long: int, max_tokens: int,
               long_tokens: int, delay_s: float) -> list[RequestSpec]:
    """Long generations already running when a burst of short questions arrives: shows
    whether the questions wait behind them. The long ones have no passage (index -1)."""
    longs = [RequestSpec("long", -1, long_tokens) for _ in range(num_long)]
    return longs + [replace(spec, at_s=delay_s) for spec in plan_burst(passages, max_tokens)]


def plan_clients(passages: list[list[Question]], max_tokens: int, num_clients: int,
                 seed: int) -> list[RequestSpec]:
    """Users asking about the passages in no particular order: every question, shuffled
    (seeded), dealt in turn to `num_clients` clients; each client asks its next question when
    the answer to its last has arrived, so at most `num_clients` are in flight."""
    questions = [q for qs in passages for q in qs]
    random.Random(seed).shuffle(questions)
    return [_question_spec(q, max_tokens,
                           after=position - num_clients if position >= num_clients else None)
            for position, q in enumerate(questions)]


def skew_passages(passages: list[list[Question]], hot_share: float) -> list[list[Question]]:
    """One passage with most of the questions: questions of the other passages move to the
    first until it holds `hot_share` of all of them, each time the last question of the passage
    with the most left (every passage keeps at least one). A moved question asks about the
    first passage: it keeps its words and loses its gold answers."""
    hot, *others = (list(qs) for qs in passages)
    target = round(hot_share * sum(len(qs) for qs in passages))
    while others and len(hot) < target:
        donor = max(others, key=len)  # the first of those with the most questions left
        if len(donor) == 1:
            break
        moved = donor.pop()
        hot.append(replace(moved, context=hot[0].context, context_index=hot[0].context_index,
                           answers=()))
    return [hot, *others]


def arrival_times(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent, drawn as `vllm bench serve`
    draws them: gamma-distributed gaps, shape `burstiness` (1 = Poisson), mean 1/rate."""
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times


def plan_rate(questions: list[Question], max_tokens: int, rate: float, burstiness: float,
              seed: int) -> list[RequestSpec]:
    """Open loop: each question goes at its arrival time, however many are still running."""
    times = arrival_times(len(questions), rate, burstiness, seed)
    return [_question_spec(q, max_tokens, at_s=at) for q, at in zip(questions, times)]


def build_plan(args: argparse.Namespace) -> list[RequestSpec]:
    """The plan of one round of the scenario the flags ask for."""
    plan = _scenario_plan(args)
    if args.system_prompt_file is None:
        return plan
    system_prompt = Path(args.system_prompt_file).read_text()
    return [replace(spec, system_prompt=system_prompt) if spec.kind == "question" else spec
            for spec in plan]


def _scenario_plan(args: argparse.Namespace) -> list[RequestSpec]:
    if args.scenario == "rate":
        count = math.ceil(args.num_requests / QUESTIONS_PER_CONTEXT)
        flat = [q for qs in passage_questions(args.context_offset, count) for q in qs]
        return plan_rate(flat[: args.num_requests], args.max_tokens, args.request_rate,
                         args.burstiness, args.seed)
    passages = passage_questions(args.context_offset, args.contexts)
    if args.hot_share:
        passages = skew_passages(passages, args.hot_share)
    if args.scenario == "burst":
        return plan_burst(passages, args.max_tokens)
    if args.scenario == "trickle":
        return plan_trickle(passages, args.max_tokens)
    if args.scenario == "clients":
        return plan_clients(passages, args.max_tokens, args.clients, args.seed)
    return plan_mixed(passages, args.long, args.max_tokens, args.long_tokens, args.delay)


def shipped_passages() -> int:
    return len(json.loads(SELECTION_FILE.read_text())["contexts"])


def passages_used(args: argparse.Namespace) -> int:
    """How many passages from --context-offset a run reads (the next run's offset); mixed's
    long generations read none."""
    if args.scenario == "rate":
        return math.ceil(args.num_requests / QUESTIONS_PER_CONTEXT)
    return args.contexts


# --- running a plan ---


def usage_tokens(usage: dict, timings: dict | None = None) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a final chunk. llama.cpp's server may say what it
    took from its cache only in `timings` (`cache_n` cached, `prompt_n` computed), so that is
    read when the usage has no cached_tokens."""
    timings = timings or {}
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is None and timings.get("cache_n") is not None:
        cached = int(timings["cache_n"])
    else:
        cached = _cached_tokens(usage)
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = int(timings.get("cache_n") or 0) + int(timings.get("prompt_n") or 0)
    return int(prompt), int(usage.get("completion_tokens") or 0), cached


def chat_body(messages: list[dict], max_tokens: int, model: str | None,
              group_id: str | None) -> dict:
    """Plain OpenAI fields, greedy, streamed with usage; `group_id` only with hints on."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if group_id is not None:
        body["group_id"] = group_id
    return body


async def _read_stream(client: httpx.AsyncClient, body: dict, record: RequestRecord,
                       clock: Callable[[], float]) -> None:
    """Fills `record` chunk by chunk, so a stream that breaks keeps what had arrived."""
    headers = {"X-Group-Id": body["group_id"]} if "group_id" in body else {}
    usage = timings = None
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers=headers) as response:
        record.replica = response.headers.get("x-groupwise-replica")
        await _raise_for_status(response)
        async for chunk in _sse_chunks(response):
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = clock()
                    if record.first_token_s is None:
                        record.first_token_s = now
                    else:
                        record.chunk_s.append(now)
                    record.text += content
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    if usage is None:
        raise ServerError("the stream carried no usage: the server must honour "
                          "stream_options.include_usage")
    record.prompt_tokens, record.completion_tokens, record.cached_tokens = usage_tokens(
        usage, timings)


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, model: str | None,
                       group_id: str | None, clock: Callable[[], float],
                       timeout_s: float) -> RequestRecord:
    """One streamed request -> its record. Never raises: a failure is a result to count."""
    question = spec.question
    record = RequestRecord(spec.kind, spec.passage, question.id if question else None,
                           list(question.answers) if question else [], group_id)
    body = chat_body(spec.messages, spec.max_tokens, model, group_id)
    record.sent_s = clock()
    try:
        async with asyncio.timeout(timeout_s):
            await _read_stream(client, body, record, clock)
    except TimeoutError:
        record.error = f"no complete answer within {timeout_s:g} s"
    except ServerError as exc:
        record.error = str(exc)
    except Exception as exc:  # transport errors, bad JSON: the run goes on and counts it
        record.error = f"{type(exc).__name__}: {exc}"
    record.end_s = clock()
    return record


async def run_plan(client: httpx.AsyncClient, plan: Sequence[RequestSpec], model: str | None,
                   ids: Sequence[str | None], timeout_s: float,
                   progress: Progress | None = None) -> list[RequestRecord]:
    """Sends every request of the plan at its time (or when the one it follows has ended),
    never waiting for unrelated ones; `ids` are the requests' group ids (None: no hint)
    -> the records in plan order."""
    started = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - started

    ended = [asyncio.Event() for _ in plan]
    records: list[RequestRecord | None] = [None] * len(plan)

    async def run_one(position: int) -> None:
        spec = plan[position]
        if spec.after is not None:
            await ended[spec.after].wait()
        while (wait := spec.at_s - clock()) > 0:  # a timer may fire a hair early
            await asyncio.sleep(wait)
        records[position] = await send_request(client, spec, model, ids[position], clock,
                                               timeout_s)
        ended[position].set()
        if progress:
            progress.advance(1)

    async with asyncio.TaskGroup() as tasks:
        for position in range(len(plan)):
            tasks.create_task(run_one(position))
    return [record for record in records if record is not None]


def group_ids(plan: Sequence[RequestSpec], run_id: str, round_number: int,
              hints: bool) -> list[str | None]:
    """One id per passage and round, new for every run: a server never joins two rounds."""
    if not hints:
        return [None] * len(plan)
    return [f"{run_id}-r{round_number}-p{spec.passage}" for spec in plan]


# --- the summary and the report ---


def _stats(name: str, values_ms: list[float]) -> dict:
    if not values_ms:
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "p99", "std")}
    return {
        f"mean_{name}_ms": statistics.fmean(values_ms),
        f"median_{name}_ms": percentile(values_ms, 0.5),
        f"p99_{name}_ms": percentile(values_ms, 0.99),
        f"std_{name}_ms": statistics.pstdev(values_ms),
    }


def _rate(count: float, duration: float) -> float | None:
    return count / duration if duration > 0 else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: Sequence[RequestRecord]) -> dict:
    """The figures of `vllm bench serve` plus prompt tokens and scores, from the records alone
    (pure, so tests feed known timings). Timings, tokens and scores are of the successful
    requests; failed ones are counted, and still stretch the duration."""
    ok = [r for r in records if r.error is None]
    duration = max(r.end_s for r in records) - min(r.sent_s for r in records) if records else 0.0
    billed = sum(r.prompt_tokens for r in ok)
    generated = sum(r.completion_tokens for r in ok)
    computed = billed - sum(r.cached_tokens for r in ok)
    timed = [r for r in ok if r.first_token_s is not None]
    scores = [score_answer(r.text, r.gold_answers) for r in ok
              if r.kind == "question" and r.gold_answers]
    return {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": billed,
        "total_output_tokens": generated,
        "request_throughput": _rate(len(ok), duration),
        "output_throughput": _rate(generated, duration),
        "total_token_throughput": _rate(billed + generated, duration),
        **_stats("ttft", [(r.first_token_s - r.sent_s) * 1000 for r in timed]),
        **_stats("tpot", [(r.end_s - r.first_token_s) / (r.completion_tokens - 1) * 1000
                          for r in timed if r.completion_tokens > 1]),
        **_stats("itl", [gap * 1000 for r in ok for gap in r.itl_s]),
        **_stats("e2el", [(r.end_s - r.sent_s) * 1000 for r in ok]),
        "prompt_tokens_billed": billed,
        "prompt_tokens_computed": computed,
        "computed_share": computed / billed if billed else None,
        "em": _mean([s["em"] for s in scores]),
        "f1": _mean([s["f1"] for s in scores]),
    }


def _row(label: str, value, digits: int = 2) -> str:
    if value is None:
        shown = "-"
    elif isinstance(value, float):
        shown = f"{value:.{digits}f}"
    else:
        shown = str(value)
    return f"{label:<40} {shown:<10}"


def _latency_rows(summary: dict, key: str, short: str, title: str) -> list[str]:
    return [f"{title:-^50}"] + [
        _row(f"{label} {short} (ms):", summary[f"{stat}_{key}_ms"])
        for label, stat in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))
    ]


def format_report(summary: dict) -> str:
    """The block `vllm bench serve` prints, and a last section for prompt tokens and scores."""
    lines = [
        f"{' Serving Benchmark Result ':=^50}",
        _row("Successful requests:", summary["completed"]),
        _row("Failed requests:", summary["failed"]),
        _row("Benchmark duration (s):", summary["duration"]),
        _row("Total input tokens:", summary["total_input_tokens"]),
        _row("Total generated tokens:", summary["total_output_tokens"]),
        _row("Request throughput (req/s):", summary["request_throughput"]),
        _row("Output token throughput (tok/s):", summary["output_throughput"]),
        _row("Total Token throughput (tok/s):", summary["total_token_throughput"]),
        *_latency_rows(summary, "ttft", "TTFT", "Time to First Token"),
        *_latency_rows(summary, "tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        *_latency_rows(summary, "itl", "ITL", "Inter-token Latency"),
        *_latency_rows(summary, "e2el", "E2EL", "End-to-end Latency"),
        f"{'Prompt Tokens and Answers':-^50}",
        _row("Prompt tokens billed:", summary["prompt_tokens_billed"]),
        _row("Prompt tokens computed:", summary["prompt_tokens_computed"]),
        _row("Computed share:", summary["computed_share"], 3),
        _row("EM:", summary["em"], 3),
        _row("F1:", summary["f1"], 3),
        "=" * 50,
    ]
    return "\n".join(lines)


def round_result(number: int, records: Sequence[RequestRecord], scenario: str) -> dict:
    """One round for the JSON file: its summary (mixed: the questions' and the long ones'
    apart, so the long generations do not blur the questions' latency) and every request."""
    result: dict = {"round": number}
    if scenario == "mixed":
        result["questions"] = summarize([r for r in records if r.kind == "question"])
        result["long"] = summarize([r for r in records if r.kind == "long"])
    else:
        result["summary"] = summarize(records)
    result["requests"] = [asdict(record) for record in records]
    return result


def question_summary(result: dict) -> dict:
    """A round's summary of its questions, whatever the scenario."""
    return result["questions"] if "questions" in result else result["summary"]


def format_result(result: dict) -> str:
    """The reports of every round (mixed: questions, then long generations)."""
    config, blocks = result["config"], []
    for round_ in result["rounds"]:
        heading = (f"{config['scenario']}, round {round_['round']} of {config['rounds']}, "
                   f"model {config['model']}")
        parts = ([("questions", round_["questions"]), ("long generations", round_["long"])]
                 if "questions" in round_ else [("", round_["summary"])])
        for label, summary in parts:
            blocks.append(f"{heading}{': ' + label if label else ''}\n{format_report(summary)}")
    return "\n\n".join(blocks)


# --- the run ---


def open_client(args: argparse.Namespace,
                transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """No connection limit: an open-loop bench must never queue on the client side."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(
        base_url=base_url(args.url), headers=headers, transport=transport,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        timeout=httpx.Timeout(args.timeout, connect=10.0),
    )


async def _warm_up(client: httpx.AsyncClient, model: str, timeout_s: float) -> None:
    """One short untimed request on no passage: first-request costs stay out of the figures,
    and no passage enters a prefix cache before its round. A failure here shows again,
    counted, in the rounds."""
    body = chat_body(WARMUP_MESSAGES, 4, model, None)
    record = RequestRecord("warmup", -1, None, [], None)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await _read_stream(client, body, record, time.perf_counter)


async def run_rounds(args: argparse.Namespace, plan: list[RequestSpec],
                     transport: httpx.AsyncBaseTransport | None = None) -> tuple[str, list[dict]]:
    """Every round of the plan in turn -> (model, round results)."""
    run_id = f"load-{uuid.uuid4().hex[:8]}"
    async with open_client(args, transport) as client:
        model = args.model or await fetch_model_id(client)
        if args.warmup:
            await _warm_up(client, model, args.timeout)
        rounds = []
        for number in range(1, args.rounds + 1):
            progress = Progress(f"{args.scenario} round {number}/{args.rounds}", len(plan))
            ids = group_ids(plan, run_id, number, args.group_hints)
            records = await run_plan(client, plan, model, ids, args.timeout, progress)
            progress.close()
            rounds.append(round_result(number, records, args.scenario))
    return model, rounds


def run_config(args: argparse.Namespace, model: str, plan: list[RequestSpec]) -> dict:
    """The run's settings for the JSON file (never the API key)."""
    return {
        "url": args.url,
        "scenario": args.scenario,
        "model": model,
        "rounds": args.rounds,
        "context_offset": args.context_offset,
        "passages": sorted({spec.passage for spec in plan}),
        "questions": sum(spec.kind == "question" for spec in plan),
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "group_hints": args.group_hints,
        "warmup": args.warmup,
        "timeout": args.timeout,
        **({"request_rate": args.request_rate, "burstiness": args.burstiness,
            "num_requests": args.num_requests, "seed": args.seed}
           if args.scenario == "rate" else {}),
        **({"long": args.long, "long_tokens": args.long_tokens, "delay": args.delay}
           if args.scenario == "mixed" else {}),
        **({"clients": args.clients, "seed": args.seed} if args.scenario == "clients" else {}),
        **({"hot_share": args.hot_share} if args.hot_share else {}),
        **({"system_prompt_file": args.system_prompt_file} if args.system_prompt_file else {}),
    }


def run_load(args: argparse.Namespace,
             transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """A whole run -> {"config", "rounds"}. Raises ServerError only when the server cannot be
    asked at all (no model list); failed requests are in the rounds."""
    plan = build_plan(args)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    model, rounds = asyncio.run(run_rounds(args, plan, transport))
    return {"config": run_config(args, model, plan) | {"started_at": started_at},
            "rounds": rounds}


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # the module's docstring in full: its examples and the scenarios' descriptions
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server root, e.g. http://localhost:8000")
    parser.add_argument("--scenario", required=True, choices=SCENARIOS,
                        help="the traffic pattern (described above)")
    parser.add_argument("--contexts", type=positive(int), default=8,
                        help="passages of 5 questions (default 8; rate: see --num-requests)")
    parser.add_argument("--context-offset", type=int, default=0,
                        help="first passage of the shipped selection (default 0): a run on new "
                        "passages finds nothing of them in a server's cache")
    parser.add_argument("--rounds", type=positive(int), default=1,
                        help="run the scenario this many times on the same passages (default 1)")
    parser.add_argument("--group-hints", action="store_true",
                        help="send a group id per passage and round (body `group_id` and "
                        "header `X-Group-Id`)")
    parser.add_argument("--model", help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    add_request_flags(parser)
    parser.add_argument("--long", type=positive(int), default=1,
                        help="mixed: long generations (default 1)")
    parser.add_argument("--long-tokens", type=positive(int), default=256,
                        help="mixed: max_tokens of a long generation (default 256)")
    parser.add_argument("--delay", type=float, default=1.0,
                        help="mixed: seconds from the long generations to the questions "
                        "(default 1.0)")
    parser.add_argument("--num-requests", type=positive(int), default=40,
                        help="rate: questions, in passage order (default 40)")
    parser.add_argument("--request-rate", type=positive(float),
                        help="rate: mean arrivals per second (required for rate)")
    parser.add_argument("--burstiness", type=positive(float), default=1.0,
                        help="rate: gamma shape of the gaps; 1 = Poisson, lower = burstier")
    parser.add_argument("--seed", type=int, default=0,
                        help="rate: arrival-time seed; clients: question-order seed (default 0)")
    parser.add_argument("--clients", type=positive(int), default=4,
                        help="clients: users asking at once (default 4)")
    parser.add_argument("--hot-share", type=float, default=0.0,
                        help="share of the questions asked about the first passage, moved there "
                        "from the others (default 0: none moved)")
    parser.add_argument("--system-prompt-file",
                        help="every question's system prompt, from this file (default: the "
                        "answer-in-tags prompt)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed warm-up request")
    parser.add_argument("--json", help="write the config, every round's summary and every "
                        "request here")
    args = parser.parse_args(argv)
    if args.scenario == "rate" and args.request_rate is None:
        parser.error("--scenario rate needs --request-rate")
    if args.request_rate is not None and not math.isfinite(args.request_rate):
        parser.error("--request-rate must be finite (use --scenario burst for all at once)")
    if args.context_offset < 0:
        parser.error("--context-offset must be >= 0")
    if args.delay < 0:
        parser.error("--delay must be >= 0")
    if not 0 <= args.hot_share < 1:
        parser.error("--hot-share must be in [0, 1)")
    if args.hot_share and args.scenario == "rate":
        parser.error("--hot-share moves questions between passages; rate asks them in order")
    if args.system_prompt_file is not None and not Path(args.system_prompt_file).is_file():
        parser.error(f"--system-prompt-file: no file at {args.system_prompt_file}")
    last = args.context_offset + passages_used(args)
    if last > shipped_passages():
        parser.error(f"this run reads passages {args.context_offset} to {last - 1}; the shipped "
                     f"selection has {shipped_passages()}")
    return args


def main(argv: list[str] | None = None,
         transport: httpx.AsyncBaseTransport | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_load(args, transport)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:  # first: the records outlive a closed stdout
        write_result(args.json, result)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
