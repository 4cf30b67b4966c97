"""Our server and llama.cpp's server side by side on the load bench's scenarios.

    python -m bench.compare                                  # starts both, runs all, stops both
    python -m bench.compare --ours URL --peer URL            # servers already running
    python -m bench.compare --before URL                     # also an earlier build of ours
    python -m bench.compare --scenarios burst,trickle --json compare.json

Each scenario runs on our server, then (with --before) on an earlier build of it, then on
llama.cpp's, then the next scenario; every scenario has its own passages of the shipped selection
(the same for every server), so none starts with another's passages in a cache. Group hints go
to our server (either build) only, except in `burst-nohints`; llama.cpp gets plain OpenAI
requests. One markdown table: per scenario and round, request throughput, TTFT p50/p99, E2E p50,
computed share of the prompt tokens and F1 on each server, with the ratios ours/before and
ours/llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import load
from bench.cli import add_request_flags, add_start_timeout_flag
from bench.squad_http import ServerError

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "bench" / "peers" / "llama_cpp.sh"
OURS, BEFORE, PEER = "ours", "before", "llama.cpp"  # the targets' names, in running order


@dataclass(frozen=True)
class Target:
    """A server the scenarios run on, under its name in the table and the JSON."""

    name: str
    url: str
    hints: bool  # takes group hints: our server, any build (llama.cpp's gets plain requests)


@dataclass(frozen=True)
class Case:
    """One scenario of the comparison: the `bench.load` flags it runs with."""

    name: str
    scenario: str
    flags: tuple[str, ...]
    hints: bool = True  # group hints to our server (llama.cpp never gets them)


CASES = (
    Case("burst", "burst", ("--contexts", "8")),
    Case("burst-nohints", "burst", ("--contexts", "8"), hints=False),  # automatic grouping
    Case("trickle", "trickle", ("--contexts", "8", "--rounds", "2")),
    Case("mixed", "mixed", ("--contexts", "4", "--long", "1")),
    Case("rate", "rate", ("--num-requests", "40", "--request-rate", "2")),
)


@dataclass(frozen=True)
class Figure:
    label: str
    key: str  # in bench.load's summary
    show: Callable[[float], str]
    has_ratio: bool = True


FIGURES = (
    Figure("Request throughput (req/s)", "request_throughput", lambda v: f"{v:.2f}"),
    Figure("TTFT p50 (ms)", "median_ttft_ms", lambda v: f"{v:.1f}"),
    Figure("TTFT p99 (ms)", "p99_ttft_ms", lambda v: f"{v:.1f}"),
    Figure("E2E p50 (ms)", "median_e2el_ms", lambda v: f"{v:.1f}"),
    Figure("Computed share", "computed_share", lambda v: f"{v:.3f}"),
    Figure("F1", "f1", lambda v: f"{v:.3f}"),
    Figure("Failed requests", "failed", str, has_ratio=False),
)


def case_offsets(cases: tuple[Case, ...] = CASES) -> dict[str, int]:
    """Each case's first passage: after all passages of the cases before it in CASES, so a
    subset picked with --scenarios reads the same passages as the full run."""
    offsets, offset = {}, 0
    for case in cases:
        offsets[case.name] = offset
        offset += load.passages_used(load_args(case, "http://unused", 0, hints=False, common=[]))
    return offsets


def load_args(case: Case, url: str, offset: int, hints: bool,
              common: list[str]) -> argparse.Namespace:
    """bench.load's own flag parsing, so a case means exactly what its command line means."""
    argv = ["--url", url, "--scenario", case.scenario, "--context-offset", str(offset),
            *case.flags, *common, *(["--group-hints"] if hints else [])]
    return load.parse_args(argv)


def row_names(case: Case, rounds: int) -> list[str]:
    """A round 2 shows what a server kept of the passages from round 1."""
    names = [case.name, f"{case.name} (seen again)"]
    return [names[i] if i < 2 else f"{case.name} (round {i + 1})" for i in range(rounds)]


def ratio(ours: float | None, peer: float | None) -> float | None:
    return ours / peer if ours is not None and peer else None


def ratio_names(names: list[str]) -> list[str]:
    """The ratio columns: the first target (ours) over each of the others."""
    return [f"{names[0]}/{name}" for name in names[1:]]


def comparison_rows(case: Case, results: dict[str, dict]) -> list[dict]:
    """One row per round and figure (questions only): the figure on every target, in the order
    of `results` (ours first), then the ratios ours/other, e.g. {"ours": .., "llama.cpp": ..,
    "ours/llama.cpp": ..}."""
    names = list(results)
    rows = []
    rounds = len(results[names[0]]["rounds"])
    for index, row_name in enumerate(row_names(case, rounds)):
        summaries = [load.question_summary(results[name]["rounds"][index]) for name in names]
        for figure in FIGURES:
            values = [summary[figure.key] for summary in summaries]
            ratios = [ratio(values[0], value) if figure.has_ratio else None
                      for value in values[1:]]
            rows.append({"scenario": row_name, "figure": figure.label, "key": figure.key,
                         **dict(zip(names, values)), **dict(zip(ratio_names(names), ratios))})
    return rows


def format_table(rows: list[dict], names: list[str]) -> str:
    """The rows as markdown: a column per target in `names` (ours first), then the ratios."""
    shows = {figure.key: figure.show for figure in FIGURES}
    ratios = ratio_names(names)

    def cell(value, show) -> str:
        return "-" if value is None else show(value)

    columns = ["scenario", "figure", *names, *ratios]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "--:|" * (len(columns) - 2)]
    for row in rows:
        show = shows[row["key"]]
        cells = [row["scenario"], row["figure"],
                 *(cell(row[name], show) for name in names),
                 *(cell(row[name], "{:.2f}".format) for name in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the servers ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, name: str, log: Path,
                 timeout_s: float) -> None:
    """Until GET /health answers 200 (both servers answer 503 while loading the model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: {name} exited with status {process.returncode} before it "
                             f"was healthy; its log: {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {name} was not healthy after {timeout_s:g} s; its log: {log}")


@contextmanager
def running_server(name: str, command: list[str], port: int, logs: Path, timeout_s: float,
                   env: dict | None = None) -> Iterator[str]:
    """Starts a server, yields its URL once healthy, and stops it with SIGTERM (our server
    drains; llama.cpp's stops) at the end, killing it if it hangs."""
    log = logs / f"{name}.log"
    url = f"http://127.0.0.1:{port}"
    print(f"starting {name}: {shlex.join(command)} (log: {log})", file=sys.stderr)
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env=env)
        try:
            wait_healthy(url, process, name, log, timeout_s)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def our_command(port: int, extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "--port", str(port), *shlex.split(extra)]


def peer_command(extra: str) -> list[str]:
    return ["bash", str(PEER_SCRIPT), *shlex.split(extra)]


def server_targets(args: argparse.Namespace, stack: ExitStack) -> list[Target]:
    """Ours, before (only when --before names it; never started here) and llama.cpp, in the
    order each scenario runs on them: the URLs given, or servers started here (stopped when
    `stack` closes)."""
    logs = None if args.ours and args.peer else Path(tempfile.mkdtemp(prefix="groupwise-compare-"))
    urls = {}
    if args.ours:
        urls[OURS] = args.ours.rstrip("/")
    else:
        port = free_port()
        urls[OURS] = stack.enter_context(running_server(
            OURS, our_command(port, args.ours_args), port, logs, args.start_timeout))
    if args.before:
        urls[BEFORE] = args.before.rstrip("/")
    if args.peer:
        urls[PEER] = args.peer.rstrip("/")
    else:
        build = subprocess.run(["bash", str(PEER_SCRIPT), "--build-only"])  # once, ~10 min
        if build.returncode != 0:
            raise SystemExit(f"error: {PEER_SCRIPT.name} --build-only failed "
                             f"(status {build.returncode})")
        port = free_port()
        env = os.environ | {"PORT": str(port)}
        urls[PEER] = stack.enter_context(running_server(
            PEER, peer_command(args.peer_args), port, logs, args.start_timeout, env))
    return [Target(name, url, hints=name != PEER) for name, url in urls.items()]


# --- the run ---


def run_case(case: Case, offset: int, targets: list[Target], common: list[str],
             transports: dict[str, httpx.AsyncBaseTransport] | None = None) -> dict:
    """One scenario on each target in turn, on the same passages -> {name: bench.load result};
    `transports` (by target name) stand in for servers in tests."""
    results = {}
    for target in targets:
        print(f"{case.name} on {target.name}", file=sys.stderr)
        args = load_args(case, target.url, offset, case.hints and target.hints, common)
        results[target.name] = load.run_load(args, (transports or {}).get(target.name))
    return results


def _scenario_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [case.name for case in CASES]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"pick from {', '.join(known)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", help="our server's root URL (default: start one here)")
    parser.add_argument("--peer", help="llama.cpp server's root URL (default: start one here "
                        "with bench/peers/llama_cpp.sh)")
    parser.add_argument("--before", metavar="URL",
                        help="root URL of an earlier build of our server, already running (never "
                        "started here): each scenario then runs on it too, after ours")
    parser.add_argument("--ours-args", default="",
                        help="extra flags for `python -m server`, e.g. \"--threads 2\"")
    parser.add_argument("--peer-args", default="", help="extra flags for llama-server")
    parser.add_argument("--scenarios", type=_scenario_names,
                        default=[case.name for case in CASES],
                        help="comma-separated subset of " + ", ".join(c.name for c in CASES))
    add_request_flags(parser)
    add_start_timeout_flag(parser)
    parser.add_argument("--json", help="write the table's rows and every run here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None,
         transports: dict[str, httpx.AsyncBaseTransport] | None = None) -> int:
    args = parse_args(argv)
    cases = [case for case in CASES if case.name in args.scenarios]
    offsets = case_offsets()
    common = ["--max-tokens", str(args.max_tokens), "--timeout", str(args.timeout)]
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs, rows = [], []
    with ExitStack() as stack:
        targets = server_targets(args, stack)
        try:
            for case in cases:
                results = run_case(case, offsets[case.name], targets, common, transports)
                runs.append({"scenario": case.name, **results})
                rows += comparison_rows(case, results)
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    names = [target.name for target in targets]
    config = {"urls": {target.name: target.url for target in targets},
              "scenarios": [case.name for case in cases], "max_tokens": args.max_tokens,
              "started_at": started_at}
    if args.json:
        payload = {"config": config, "rows": rows, "runs": runs}
        Path(args.json).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(format_table(rows, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
