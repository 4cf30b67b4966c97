"""Our server and llama.cpp's server side by side on the load bench's scenarios.

    python -m bench.compare                                  # starts both, runs all, stops both
    python -m bench.compare --ours URL --peer URL            # servers already running
    python -m bench.compare --scenarios burst,trickle --json compare.json

Each scenario runs on our server, then on llama.cpp's, then the next scenario; every scenario has
its own passages of the shipped selection (the same for both servers), so none starts with the
other's passages in a cache. Group hints go to our server only, except in `burst-nohints`;
llama.cpp gets plain OpenAI requests. One markdown table: per scenario and round, request
throughput, TTFT p50/p99, E2E p50, computed share of the prompt tokens and F1, with the ratio
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
from bench.run_squad import _positive
from bench.squad_http import ServerError

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "bench" / "peers" / "llama_cpp.sh"
SIDES = ("ours", "llama.cpp")


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
    Case("trickle", "trickle", ("--contexts", "4", "--rounds", "2")),
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


def comparison_rows(case: Case, results: dict[str, dict]) -> list[dict]:
    """One row per round and figure: ours, llama.cpp, ours/llama.cpp (questions only)."""
    rows = []
    rounds = len(results["ours"]["rounds"])
    for index, name in enumerate(row_names(case, rounds)):
        ours, peer = (load.question_summary(results[side]["rounds"][index]) for side in SIDES)
        for figure in FIGURES:
            rows.append({
                "scenario": name, "figure": figure.label, "key": figure.key,
                "ours": ours[figure.key], "llama.cpp": peer[figure.key],
                "ratio": ratio(ours[figure.key], peer[figure.key]) if figure.has_ratio else None,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    shows = {figure.key: figure.show for figure in FIGURES}

    def cell(value, show) -> str:
        return "-" if value is None else show(value)

    lines = ["| scenario | figure | ours | llama.cpp | ours/llama.cpp |", "|---|---|--:|--:|--:|"]
    for row in rows:
        show = shows[row["key"]]
        lines.append(f"| {row['scenario']} | {row['figure']} | {cell(row['ours'], show)} | "
                     f"{cell(row['llama.cpp'], show)} | {cell(row['ratio'], '{:.2f}'.format)} |")
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


def server_urls(args: argparse.Namespace, stack: ExitStack) -> dict[str, str]:
    """The URLs given, or servers started here (stopped when `stack` closes)."""
    logs = Path(tempfile.mkdtemp(prefix="groupwise-compare-"))
    urls = {}
    if args.ours:
        urls["ours"] = args.ours.rstrip("/")
    else:
        port = free_port()
        urls["ours"] = stack.enter_context(running_server(
            "ours", our_command(port, args.ours_args), port, logs, args.start_timeout))
    if args.peer:
        urls["llama.cpp"] = args.peer.rstrip("/")
    else:
        build = subprocess.run(["bash", str(PEER_SCRIPT), "--build-only"])  # once, ~10 min
        if build.returncode != 0:
            raise SystemExit(f"error: {PEER_SCRIPT.name} --build-only failed "
                             f"(status {build.returncode})")
        port = free_port()
        env = os.environ | {"PORT": str(port)}
        urls["llama.cpp"] = stack.enter_context(running_server(
            "llama.cpp", peer_command(args.peer_args), port, logs, args.start_timeout, env))
    return urls


# --- the run ---


def run_case(case: Case, offset: int, urls: dict[str, str], common: list[str]) -> dict:
    """One scenario on each server in turn -> {side: bench.load result}."""
    results = {}
    for side in SIDES:
        print(f"{case.name} on {side}", file=sys.stderr)
        args = load_args(case, urls[side], offset, case.hints and side == "ours", common)
        results[side] = load.run_load(args)
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
    parser.add_argument("--ours-args", default="",
                        help="extra flags for `python -m server`, e.g. \"--threads 2\"")
    parser.add_argument("--peer-args", default="", help="extra flags for llama-server")
    parser.add_argument("--scenarios", type=_scenario_names,
                        default=[case.name for case in CASES],
                        help="comma-separated subset of " + ", ".join(c.name for c in CASES))
    parser.add_argument("--max-tokens", type=_positive(int), default=96,
                        help="most generated tokens per question (default 96)")
    parser.add_argument("--timeout", type=_positive(float), default=600.0,
                        help="seconds per request (default 600)")
    parser.add_argument("--start-timeout", type=_positive(float), default=600.0,
                        help="seconds a started server may take to become healthy (default 600)")
    parser.add_argument("--json", help="write the table's rows and every run here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [case for case in CASES if case.name in args.scenarios]
    offsets = case_offsets()
    common = ["--max-tokens", str(args.max_tokens), "--timeout", str(args.timeout)]
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs, rows = [], []
    with ExitStack() as stack:
        urls = server_urls(args, stack)
        try:
            for case in cases:
                results = run_case(case, offsets[case.name], urls, common)
                runs.append({"scenario": case.name, **results})
                rows += comparison_rows(case, results)
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    config = {"urls": urls, "scenarios": [case.name for case in cases],
              "max_tokens": args.max_tokens, "started_at": started_at}
    if args.json:
        payload = {"config": config, "rows": rows, "runs": runs}
        Path(args.json).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
