"""The SQuAD grouping experiment, replayed against a server over HTTP.

    python bench/run_squad.py --url http://localhost:8000 --contexts 8 --group-sizes 1,5
    python bench/run_squad.py --url URL --mode chat               # chat requests + group_id hints
    python bench/run_squad.py --url URL --mode chat --no-hints    # any OpenAI-compatible server
    python bench/run_squad.py --url URL --faithful --json out.json --plot out.png

Questions: SQuAD v1.1 dev contexts with >= 5 questions, shuffled with --seed, the first
--contexts, their first 5 questions (`bench/squad.py`). For each group size G the groups run
one after another as fast as --concurrency allows; the tables give scores, prompt tokens billed
and computed (from the server's usage), latency per group, wall time and cost.

As in the research, grouping is compared with independent requests: each group sends its own
`cache_salt`, so it shares computation only within itself, never through what earlier groups
left in the server's prefix cache (--share-cache lets the groups of one G share it).
"""

# ruff: noqa: E402  (the path fix must run before the `bench` imports)
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import importlib.util
import time
import uuid
from dataclasses import dataclass

import httpx

from bench.cli import add_request_flags, base_url, positive
from bench.plot import plot_summaries
from bench.progress import Progress
from bench.report import Prices, format_tables, question_record, summarize, write_json
from bench.squad import Group, Question, load_selection, make_groups
from bench.squad_http import (
    Reply,
    RequestSettings,
    RequestSlots,
    ServerError,
    ask_chat,
    ask_grouped,
    fetch_model_id,
    warm_up,
)


@dataclass
class Bench:
    """What every group of a run needs: the connection and how to ask."""

    client: httpx.AsyncClient
    settings: RequestSettings
    slots: RequestSlots
    mode: str
    run_id: str
    share_cache: bool = False  # one cache_salt per group size instead of one per group

    def cache_salt(self, size: int, group_index: int) -> str:
        """Fresh per run, so nothing an earlier run left on the server is found."""
        return f"{self.run_id}-g{size}" + ("" if self.share_cache else f"-{group_index}")


def request_batches(group: Group, mode: str) -> list[list[Question]]:
    """The questions of each HTTP request of a group: one per question in chat mode; one per
    context in grouped mode (a --faithful chunk that mixes contexts takes several)."""
    if mode == "chat":
        return [[question] for question in group.questions]
    by_context: dict[int, list[Question]] = {}
    for question in group.questions:
        by_context.setdefault(question.context_index, []).append(question)
    return list(by_context.values())


async def run_group(
    bench: Bench, group: Group, group_id: str, cache_salt: str, progress: Progress | None
) -> tuple[list[Reply], float, int]:
    """Sends all requests of a group together -> (replies in group order, latency, requests).
    Latency runs from sending the first request to receiving the last answer."""
    batches = request_batches(group, bench.mode)
    await bench.slots.acquire(len(batches))
    started = time.perf_counter()

    async def send(batch: list[Question]) -> list[Reply]:
        try:
            if bench.mode == "chat":
                replies = [await ask_chat(bench.client, bench.settings, batch[0], group_id,
                                          cache_salt)]
            else:
                replies = await ask_grouped(bench.client, bench.settings, batch, cache_salt)
        finally:
            await bench.slots.release()
        if progress:
            progress.advance(len(replies))
        return replies

    async with asyncio.TaskGroup() as tasks:
        sent = [tasks.create_task(send(batch)) for batch in batches]
    latency = time.perf_counter() - started
    by_id = {reply.question_id: reply for task in sent for reply in task.result()}
    return [by_id[q.id] for q in group.questions], latency, len(batches)


async def run_group_size(bench: Bench, groups: list[Group], size: int, prices: Prices) -> dict:
    """All groups of one group size -> {"summary", "groups", "questions"}."""
    progress = Progress(f"G={size}", sum(len(g.questions) for g in groups))
    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        sent = [
            tasks.create_task(run_group(bench, group, f"{bench.run_id}-g{size}-{index}",
                                        bench.cache_salt(size, index), progress))
            for index, group in enumerate(groups)
        ]
    wall = time.perf_counter() - started
    progress.close()
    questions, group_records = [], []
    for index, (group, task) in enumerate(zip(groups, sent)):
        replies, latency, num_requests = task.result()
        questions += [question_record(q, r, index) for q, r in zip(group.questions, replies)]
        group_records.append({
            "index": index,
            "question_ids": [q.id for q in group.questions],
            "num_contexts": len({q.context_index for q in group.questions}),
            "num_requests": num_requests,
            "latency_s": latency,
        })
    summary = summarize(size, questions, group_records, wall, prices)
    return {"summary": summary, "groups": group_records, "questions": questions}


async def run_bench(
    args: argparse.Namespace,
    plans: dict[int, list[Group]],
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[str, list[dict]]:
    """Every group size in turn, after one untimed warm-up request on no passage ->
    (model, runs)."""
    prices = Prices(args.price_in, args.price_out)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base_url(args.url), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0),
                                 transport=transport) as client:
        model = args.model or await fetch_model_id(client)
        settings = RequestSettings(model, args.max_tokens, send_hints=not args.no_hints)
        bench = Bench(client, settings, RequestSlots(args.concurrency), args.mode,
                      run_id=f"squad-{uuid.uuid4().hex[:8]}", share_cache=args.share_cache)
        await warm_up(client, model)
        runs = [await run_group_size(bench, plans[size], size, prices)
                for size in args.group_sizes]
    return model, runs


def _check_concurrency(args: argparse.Namespace, plans: dict[int, list[Group]]) -> None:
    needed = max(len(request_batches(g, args.mode)) for groups in plans.values() for g in groups)
    if args.concurrency < needed:
        raise SystemExit(f"error: --concurrency {args.concurrency} is below the {needed} requests "
                         f"one group sends at once; pass --concurrency {needed} or more")


def _config(args: argparse.Namespace, model: str, selection: list[dict],
            plans: dict[int, list[Group]]) -> dict:
    """The run's settings for the JSON file (never the API key)."""
    return {
        "url": args.url,
        "mode": args.mode,
        "group_id_hints": args.mode == "chat" and not args.no_hints,
        "cache_salt": _salt_scope(args),
        "faithful": args.faithful,
        "model": model,
        "squad": args.squad or "bench/data/squad/dev-selection.json",
        "seed": args.seed,
        "contexts": len(selection),
        "questions": {size: sum(len(g.questions) for g in plan) for size, plan in plans.items()},
        "group_sizes": args.group_sizes,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "price_in_per_million": args.price_in,
        "price_out_per_million": args.price_out,
    }


def _salt_scope(args: argparse.Namespace) -> str | None:
    """What one cache_salt covers; None: plain OpenAI requests, whose groups may share the
    server's prefix cache."""
    if args.no_hints:
        return None
    return "group size" if args.share_cache else "group"


def _group_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"group sizes must be integers >= 1, got {text!r}")
    return list(dict.fromkeys(sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--url", required=True, help="server root, e.g. http://localhost:8000")
    parser.add_argument("--mode", choices=["grouped", "chat"], default="grouped",
                        help="grouped (default): one /v1/grouped_completions request per group "
                        "(one per context when a --faithful chunk mixes contexts); chat: one "
                        "streaming /v1/chat/completions request per question, a group's sent "
                        "together")
    parser.add_argument("--no-hints", action="store_true",
                        help="chat mode: plain OpenAI requests, no group_id and no cache_salt "
                        "(a server with a prefix cache may then share passages across groups)")
    parser.add_argument("--share-cache", action="store_true",
                        help="let the groups of one group size share the server's prefix cache "
                        "(one cache_salt per G, not per group): the persistent cache's saving "
                        "on top of grouping's")
    parser.add_argument("--faithful", action="store_true",
                        help="the original flat chunking: 480 questions cut into consecutive "
                        "chunks that may mix contexts")
    parser.add_argument("--contexts", type=positive(int), default=100,
                        help="how many contexts of 5 questions (default 100)")
    parser.add_argument("--seed", type=int, default=42, help="selection shuffle seed (default 42)")
    parser.add_argument("--squad", help="a full SQuAD v1.1 dev JSON instead of the shipped "
                        "selection (needed for another --seed or more than 100 contexts)")
    parser.add_argument("--group-sizes", type=_group_sizes, default=[1, 2, 3, 4, 5],
                        help="comma-separated group sizes G, run in this order (default 1,2,3,4,5)")
    parser.add_argument("--concurrency", type=positive(int), default=8,
                        help="most requests in flight (default 8)")
    parser.add_argument("--model", help="model name to send (chat default: the server's first)")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    add_request_flags(parser)
    parser.add_argument("--price-in", type=float, default=0.10,
                        help="US dollars per million prompt tokens (default 0.10)")
    parser.add_argument("--price-out", type=float, default=0.20,
                        help="US dollars per million generated tokens (default 0.20)")
    parser.add_argument("--json", help="write config, summaries, groups and every answer here")
    parser.add_argument("--plot", help="draw scores, tokens and latency against G (PNG)")
    args = parser.parse_args(argv)
    if args.no_hints and args.mode != "chat":
        parser.error("--no-hints applies to --mode chat only")
    if args.no_hints and args.share_cache:
        parser.error("--share-cache works through cache_salt, which --no-hints does not send")
    if args.price_in < 0 or args.price_out < 0:
        parser.error("--price-in and --price-out must be >= 0")
    if args.squad and not Path(args.squad).is_file():
        parser.error(f"--squad: no such file {args.squad}")
    if args.faithful and args.contexts * 5 < 60:
        parser.error("--faithful trims to a multiple of 60 questions: needs --contexts >= 12")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    return args


def main(argv: list[str] | None = None,
         transport: httpx.AsyncBaseTransport | None = None) -> int:
    args = parse_args(argv)
    selection = load_selection(args.contexts, args.squad, args.seed)
    plans = {size: make_groups(selection, size, args.faithful) for size in args.group_sizes}
    _check_concurrency(args, plans)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        model, runs = asyncio.run(run_bench(args, plans, transport))
    except (ServerError, ExceptionGroup) as error:
        failures = _leaf_errors(error)
        if not all(isinstance(failure, ServerError) for failure in failures):
            raise
        print(f"error: {failures[0]}", file=sys.stderr)
        return 1
    config = _config(args, model, selection, plans) | {"started_at": started_at}
    summaries = [run["summary"] for run in runs]
    hints = " + group_id" if config["group_id_hints"] else ""
    title = (f"SQuAD v1.1 dev, {config['contexts']} contexts, mode {args.mode}{hints}"
             f"{', faithful' if args.faithful else ''}"
             f"{', prefix cache shared per G' if args.share_cache else ''}, "
             f"model {config['model']}")
    print(f"{title}\n\n{format_tables(summaries, Prices(args.price_in, args.price_out))}")
    if args.json:
        write_json(args.json, config, runs)
    if args.plot:
        plot_summaries(args.plot, summaries, title)
    return 0


def _leaf_errors(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaf_errors(inner)]
    return [error]


if __name__ == "__main__":
    sys.exit(main())
