"""bench/report.py, bench/progress.py and the request slots: the numbers behind the tables."""

import asyncio
import io

import pytest

from bench.progress import Progress
from bench.report import Prices, format_tables, percentile, summarize
from bench.squad_http import RequestSlots


def test_percentile_interpolates_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    assert percentile([7.0], 0.99) == 7.0


def test_cost_is_per_million_tokens():
    assert Prices().cost(1_000_000, 500_000) == pytest.approx(0.10 + 0.10)
    assert Prices(2.5, 10.0).cost(2_000, 100) == pytest.approx(0.005 + 0.001)


def record(em: float, f1: float, prompt: int, cached: int, completion: int, ttft=None) -> dict:
    return {"em": em, "f1": f1, "lenient": f1, "has_tags": em > 0, "finish_reason": "stop",
            "ttft_s": ttft, "usage": {"prompt_tokens": prompt, "cached_tokens": cached,
                                      "computed_prompt_tokens": prompt - cached,
                                      "completion_tokens": completion}}


def test_summary_and_tables_from_known_records():
    questions = [record(1.0, 1.0, 300, 0, 10), record(0.0, 0.5, 300, 250, 20),
                 record(1.0, 1.0, 200, 150, 30), record(0.0, 0.0, 200, 150, 40)]
    groups = [{"num_requests": 1, "latency_s": 1.0}, {"num_requests": 1, "latency_s": 3.0}]
    summary = summarize(2, questions, groups, wall_s=4.0, prices=Prices())
    assert summary["em"] == 0.5 and summary["f1"] == pytest.approx(0.625)
    assert summary["prompt_tokens_billed"] == 1000 and summary["prompt_tokens_computed"] == 450
    assert summary["computed_share"] == pytest.approx(0.45)
    assert summary["completion_tokens"] == 100 and summary["questions_per_s"] == 1.0
    assert summary["latency_mean_s"] == 2.0 and summary["latency_p99_s"] == pytest.approx(2.98)
    assert summary["ttft_mean_s"] is None
    assert summary["cost_computed_usd"] == pytest.approx((450 * 0.1 + 100 * 0.2) / 1e6)
    tables = format_tables([summary], Prices())
    assert "| G (group size) | 2 |" in tables
    assert "| Prompt tokens, API-billed | 1,000 |" in tables
    assert "| Prompt tokens per question, computed | 112.5 |" in tables
    assert "| Latency per group, p50 (s) | 2.00 |" in tables
    assert "| Cost, computed tokens | $0.000065 |" in tables
    assert "Time to first token" not in tables  # not measured: no rows


def test_time_to_first_token_rows_appear_when_measured():
    questions = [record(1.0, 1.0, 10, 0, 1, ttft=0.25), record(1.0, 1.0, 10, 0, 1, ttft=0.75)]
    summary = summarize(1, questions, [{"num_requests": 2, "latency_s": 1.0}], 1.0, Prices())
    assert summary["ttft_p50_s"] == pytest.approx(0.5)
    assert "| Time to first token, mean (s) | 0.50 |" in format_tables([summary], Prices())


def test_progress_writes_one_line_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress("G=5", 10, stream=stream)
    progress.advance(4)
    progress.advance(6)
    assert stream.getvalue() == ""
    progress.close()
    line = stream.getvalue()
    assert line.startswith("G=5 [" + "#" * 30 + "] 10/10 questions") and line.endswith("\n")


def test_slots_take_a_whole_group_at_once_and_never_overbook():
    async def scenario() -> int:
        slots, in_use, most = RequestSlots(4), [0], [0]

        async def group(size: int):
            await slots.acquire(size)
            in_use[0] += size
            most[0] = max(most[0], in_use[0])
            for _ in range(size):
                await asyncio.sleep(0.001)
                in_use[0] -= 1
                await slots.release()

        await asyncio.gather(*(group(3) for _ in range(5)))
        with pytest.raises(ValueError):
            await slots.acquire(5)
        return most[0]

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=5)) <= 4
