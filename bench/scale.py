"""Several replicas behind the router against one replica: requests per replica, computed share.

How each way of routing spreads the requests over the replicas and how much of the prompt it
computes, on load bench traffic without group hints.

    python -m bench.scale                                  # 2 replicas, --threads 1 each
    python -m bench.scale --replicas 4 --routings cache-aware --json scale.json
    python -m bench.scale --routings cache-aware,one-replica --scenarios system-prompt

Each routing runs on servers started here, fresh (no passage in any cache), stopped after it:
  cache-aware      --replicas replicas behind the router as shipped (deploy/router/start.sh)
  router-defaults  the same router with vllm-router's own thresholds instead of the shipped ones
  least-busy       the same router with prefix matching off (--cache-threshold 1): every request
                   to the replica with the fewest requests in flight
  one-replica      the bench straight at one replica
Replicas are `python -m server --replica-name replica-I` plus --server-args; --router-args are
added to every router's flags. The scenarios (SCENARIOS) run one after the other, each on its own
passages, the same for every routing. One markdown table: per scenario and routing, the requests
each replica answered and the busiest replica's over an even share, the computed share of the
prompt tokens, the prompt tokens billed and computed, request throughput, TTFT p50 and failed
requests.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.cli import add_request_flags, add_start_timeout_flag, positive
from bench.compare import REPO, Case, case_offsets, free_port, load_args, wait_healthy

ROUTER_SCRIPT = REPO / "deploy" / "router" / "start.sh"
SYSTEM_PROMPT_FILE = Path(__file__).resolve().parent / "data" / "retrieval-system-prompt.txt"


@dataclass(frozen=True)
class Routing:
    name: str
    behind_router: bool  # --replicas replicas behind the router; else one replica, no router
    router_flags: tuple[str, ...] = ()


ROUTINGS = (
    Routing("cache-aware", True),
    Routing("router-defaults", True, ("--cache-threshold", "0.3", "--balance-abs-threshold", "64",
                                      "--balance-rel-threshold", "1.5")),
    Routing("least-busy", True, ("--cache-threshold", "1")),  # no match is ever over 100%
    Routing("one-replica", False),
)

# scenario -> bench.load flags besides --contexts (no group hints: sharing comes from the
# prefix caches alone)
SCENARIOS = {
    "burst": ("--scenario", "burst"),  # every question at once
    "trickle": ("--scenario", "trickle"),  # per passage one question after another
    "clients": ("--scenario", "clients", "--clients", "4"),  # shuffled, 4 users in turn
    # every question starts with the ~600-token instructions of a retrieval app
    "system-prompt": ("--scenario", "burst", "--system-prompt-file", str(SYSTEM_PROMPT_FILE)),
    "skewed": ("--scenario", "burst", "--hot-share", "0.6"),  # 60% ask about one passage
}

# (label, key in the table's row, format)
COLUMNS = (
    ("requests per replica", "requests_per_replica", "{}"),
    ("busiest / even", "busiest_over_even", "{:.2f}"),
    ("computed share", "computed_share", "{:.3f}"),
    ("prompt tokens billed", "prompt_tokens_billed", "{:,}"),
    ("prompt tokens computed", "prompt_tokens_computed", "{:,}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("TTFT p50 (ms)", "median_ttft_ms", "{:.0f}"),
    ("failed", "failed", "{}"),
)


def router_command(worker_urls: list[str], port: int, metrics_port: int,
                   flags: tuple[str, ...] = ()) -> list[str]:
    """The shipped router on this machine: only where the replicas are and where to listen
    (API and metrics, on the loopback) are added, then `flags`."""
    return ["sh", str(ROUTER_SCRIPT), "--worker-urls", *worker_urls, "--host", "127.0.0.1",
            "--port", str(port), "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(metrics_port), *flags]


def router_env() -> dict[str, str]:
    """The router installed beside this interpreter (the virtualenv's bin/, which need not be
    on PATH), else the one on PATH."""
    binary = Path(sys.executable).with_name("vllm-router")
    return os.environ | {"VLLM_ROUTER": str(binary)} if binary.exists() else dict(os.environ)


def replica_name(index: int) -> str:
    return f"replica-{index}"


def replica_command(port: int, index: int, extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
            "--replica-name", replica_name(index), *shlex.split(extra)]


@contextmanager
def started(name: str, command: list[str], logs: Path,
            env: dict | None = None) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A process with its output in logs/NAME.log; SIGTERM at the end (replicas drain, the
    router shuts down), killed if it is still there a minute later."""
    log = logs / f"{name}.log"
    print(f"starting {name}: {shlex.join(command)} (log: {log})", file=sys.stderr)
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env=env)
        try:
            yield process, log
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def serving(routing: Routing, replicas: int, server_args: str, router_args: str, logs: Path,
            timeout_s: float) -> Iterator[str]:
    """The URL the bench sends to: the router, or the one replica. The replicas load their
    model at the same time; the router starts once they all answer /health."""
    count = replicas if routing.behind_router else 1
    with ExitStack() as stack:
        urls = []
        for index in range(1, count + 1):
            port = free_port()
            name = f"{routing.name}-replica-{index}"
            process, log = stack.enter_context(
                started(name, replica_command(port, index, server_args), logs))
            urls.append((f"http://127.0.0.1:{port}", process, name, log))
        for url, process, name, log in urls:
            wait_healthy(url, process, name, log, timeout_s)
        if not routing.behind_router:
            yield urls[0][0]
            return
        port = free_port()
        command = router_command([url for url, *_ in urls], port, free_port(),
                                 (*routing.router_flags, *shlex.split(router_args)))
        process, log = stack.enter_context(
            started(f"{routing.name}-router", command, logs, router_env()))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, f"{routing.name}-router", log, timeout_s)
        yield url


def cases(contexts: int, names: list[str]) -> tuple[Case, ...]:
    """The chosen scenarios as bench.load cases (each reads passages of its own: main places
    them after those of every scenario before it in SCENARIOS, whichever subset runs)."""
    every = tuple(Case(name, flags[1], ("--contexts", str(contexts), *flags[2:]), hints=False)
                  for name, flags in SCENARIOS.items())
    return tuple(case for case in every if case.name in names)


def requests_per_replica(requests: list[dict], replicas: int) -> list[int]:
    """How many of the requests each replica answered (X-Groupwise-Replica), replica-1 first;
    a request that failed before any replica answered counts for none."""
    names = [replica_name(index) for index in range(1, replicas + 1)]
    return [sum(request["replica"] == name for request in requests) for name in names]


def table_row(scenario: str, routing: str, summary: dict, per_replica: list[int]) -> dict:
    even = sum(per_replica) / len(per_replica)
    return {"scenario": scenario, "routing": routing,
            "requests_per_replica": " / ".join(map(str, per_replica)),
            "busiest_over_even": max(per_replica) / even if even else None,
            **{key: summary[key] for _, key, _ in COLUMNS[2:]}}


def format_table(rows: list[dict]) -> str:
    header = ["scenario", "routing", *(label for label, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "--:|" * len(COLUMNS)]
    for row in rows:
        cells = ["-" if row[key] is None else form.format(row[key]) for _, key, form in COLUMNS]
        lines.append("| " + " | ".join([row["scenario"], row["routing"], *cells]) + " |")
    return "\n".join(lines)


def _names(known: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"pick from {', '.join(known)}; got {text!r}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=positive(int), default=2,
                        help="replicas behind the router (default 2)")
    parser.add_argument("--server-args", default="--threads 1",
                        help="flags for every `python -m server` (default \"--threads 1\")")
    parser.add_argument("--router-args", default="",
                        help="flags added to every router's, after the routing's own (e.g. "
                        "\"--balance-abs-threshold 8\" to try another threshold)")
    routing_names = tuple(routing.name for routing in ROUTINGS)
    parser.add_argument("--routings", type=_names(routing_names), default=list(routing_names),
                        help="comma-separated subset of " + ", ".join(routing_names))
    parser.add_argument("--scenarios", type=_names(tuple(SCENARIOS)), default=list(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS))
    parser.add_argument("--contexts", type=positive(int), default=8,
                        help="passages per scenario (default 8)")
    add_request_flags(parser)
    add_start_timeout_flag(parser)
    parser.add_argument("--json", help="write the table's rows and every run here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = cases(args.contexts, args.scenarios)
    offsets = case_offsets(cases(args.contexts, list(SCENARIOS)))  # a subset: the same passages
    common = ["--max-tokens", str(args.max_tokens), "--timeout", str(args.timeout)]
    logs = Path(tempfile.mkdtemp(prefix="groupwise-scale-"))
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows, runs = [], []
    for routing in (r for r in ROUTINGS if r.name in args.routings):
        replicas = args.replicas if routing.behind_router else 1
        with serving(routing, args.replicas, args.server_args, args.router_args, logs,
                     args.start_timeout) as url:
            for case in chosen:
                print(f"{case.name} via {routing.name}", file=sys.stderr)
                result = load.run_load(load_args(case, url, offsets[case.name], False, common))
                runs.append({"scenario": case.name, "routing": routing.name, **result})
                round_ = result["rounds"][0]
                rows.append(table_row(case.name, routing.name, load.question_summary(round_),
                                      requests_per_replica(round_["requests"], replicas)))
    rows.sort(key=lambda row: args.scenarios.index(row["scenario"]))
    if args.json:
        config = {"replicas": args.replicas, "server_args": args.server_args,
                  "router_args": args.router_args,
                  "routings": args.routings, "scenarios": args.scenarios,
                  "contexts": args.contexts, "max_tokens": args.max_tokens,
                  "started_at": started_at}
        payload = {"config": config, "rows": rows, "runs": runs}
        Path(args.json).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
