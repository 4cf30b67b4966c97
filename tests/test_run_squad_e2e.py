"""bench/run_squad.py end to end: `python -m server` on the embedded model, CSA off.

Answers are capped at 16 tokens to keep the suite short; the checks do not need longer ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.squad import exact_match, f1_score
from tests.test_server_process import server_process

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server_url():
    # the weights as loaded (float32): grouping is exactly invariant there (int4 can break rare
    # near-ties)
    with server_process("--csa", "off", "--weights", "loaded", startup_s=300) as (_, url):
        yield url


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
def test_grouped_mode_computes_everything_alone_and_a_third_at_g5(server_url, tmp_path):
    """Against independent requests, as in the research: at G=1 nothing is shared (the server's
    prefix cache holds the passages from earlier questions, but each group has its own salt)."""
    result = run_bench(server_url, tmp_path / "grouped.json",
                       "--contexts", "2", "--group-sizes", "1,5")
    single, grouped = result["runs"]
    for run in result["runs"]:
        assert run["summary"]["num_questions"] == 10
        assert_scores_match_answers(run)
    billed = grouped["summary"]["prompt_tokens_billed"]
    assert billed == single["summary"]["prompt_tokens_billed"] > 0
    assert single["summary"]["prompt_tokens_computed"] == billed
    assert grouped["summary"]["prompt_tokens_computed"] <= billed / 3
    # CSA off: grouping changes the cost, never the answers
    texts = {q["id"]: q["text"] for q in single["questions"]}
    assert {q["id"]: q["text"] for q in grouped["questions"]} == texts


@pytest.mark.slow
def test_share_cache_shows_the_persistent_cache_on_top(server_url, tmp_path):
    result = run_bench(server_url, tmp_path / "shared.json",
                       "--contexts", "1", "--group-sizes", "1", "--share-cache")
    (run,) = result["runs"]
    # the passage's later questions find it in the cache: about a fifth computed
    assert run["summary"]["prompt_tokens_computed"] < 0.5 * run["summary"]["prompt_tokens_billed"]


@pytest.mark.slow
def test_chat_without_hints_runs_as_plain_openai(server_url, tmp_path):
    result = run_bench(server_url, tmp_path / "chat.json", "--contexts", "1",
                       "--group-sizes", "5", "--mode", "chat", "--no-hints")
    (run,) = result["runs"]
    assert result["config"]["group_id_hints"] is False
    assert run["summary"]["num_questions"] == 5 and run["summary"]["ttft_mean_s"] is not None
    assert_scores_match_answers(run)
