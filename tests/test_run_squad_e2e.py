"""bench/run_squad.py end to end: `python -m server` on the embedded model, CSA off.

Answers are capped at 16 tokens to keep the suite short; the checks do not need longer ones.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.squad import exact_match, f1_score

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy server at {url} after {timeout} s")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--csa", "off"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def run_bench(url: str, out: Path, *flags: str) -> dict:
    command = [sys.executable, "bench/run_squad.py", "--url", url, "--json", str(out),
               "--max-tokens", "16", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| G (group size) |" in done.stdout
    return json.loads(out.read_text())


def assert_scores_match_answers(run: dict) -> None:
    records = run["questions"]
    for record in records:
        golds = record["gold_answers"]
        prediction = record["answer"] if record["has_tags"] else record["text"].strip()
        em = max(exact_match(prediction, gold) for gold in golds) if record["has_tags"] else 0.0
        assert record["em"] == em
        assert record["f1"] == max(f1_score(prediction, gold) for gold in golds)
    assert run["summary"]["em"] == pytest.approx(sum(r["em"] for r in records) / len(records))
    assert run["summary"]["f1"] == pytest.approx(sum(r["f1"] for r in records) / len(records))


@pytest.mark.slow
def test_grouped_mode_computes_half_the_billed_prompt_at_g5(server_url, tmp_path):
    result = run_bench(server_url, tmp_path / "grouped.json",
                       "--contexts", "2", "--group-sizes", "1,5")
    single, grouped = result["runs"]
    for run in result["runs"]:
        assert run["summary"]["num_questions"] == 10
        assert_scores_match_answers(run)
    billed = grouped["summary"]["prompt_tokens_billed"]
    assert billed == single["summary"]["prompt_tokens_billed"] > 0
    assert grouped["summary"]["prompt_tokens_computed"] <= 0.5 * billed
    # CSA off: grouping changes the cost, never the answers
    texts = {q["id"]: q["text"] for q in single["questions"]}
    assert {q["id"]: q["text"] for q in grouped["questions"]} == texts


@pytest.mark.slow
def test_chat_without_hints_runs_as_plain_openai(server_url, tmp_path):
    result = run_bench(server_url, tmp_path / "chat.json", "--contexts", "1",
                       "--group-sizes", "5", "--mode", "chat", "--no-hints")
    (run,) = result["runs"]
    assert result["config"]["group_id_hints"] is False
    assert run["summary"]["num_questions"] == 5 and run["summary"]["ttft_mean_s"] is not None
    assert_scores_match_answers(run)
