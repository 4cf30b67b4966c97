"""The in-process bench on the tiny model: groups, accounting, table and JSON."""

from __future__ import annotations

import json

from bench.engine_bench import main


def test_bench_reports_consistent_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = main(["--model", "tiny-random", "--contexts", "2", "--group-sizes", "1,2,5",
                   "--csa", "untrained", "--max-tokens", "4", "--prefix-cache", "off",
                   "--json", str(out)])
    assert json.loads(out.read_text()) == report
    rows = {row["group_size"]: row for row in report["results"]}
    assert [rows[g]["num_groups"] for g in (1, 2, 5)] == [10, 6, 2]
    assert all(row["num_questions"] == 10 for row in rows.values())
    assert len({row["prompt_tokens_billed"] for row in rows.values()}) == 1
    assert rows[5]["prompt_tokens_computed"] < rows[2]["prompt_tokens_computed"]
    assert rows[2]["prompt_tokens_computed"] < rows[1]["prompt_tokens_computed"]
    assert rows[1]["prompt_tokens_computed"] == rows[1]["prompt_tokens_billed"]
    # the untrained CSA is the identity: grouping changes the cost, never the answers
    assert rows[1]["answers"] == rows[2]["answers"] == rows[5]["answers"]
    assert all(row["same_as_first"] == 1 and not row["differing_from_first"]
               for row in rows.values())
    table = capsys.readouterr().out
    assert "| G |" in table and f"{rows[5]['prompt_tokens_computed']:,}" in table


def test_the_prefix_cache_shares_a_passage_between_groups(capsys):
    args = ["--model", "tiny-random", "--contexts", "2", "--group-sizes", "1", "--csa", "off",
            "--max-tokens", "4"]
    cold = main([*args, "--prefix-cache", "off"])["results"][0]
    warm = main(args)["results"][0]
    assert warm["prompt_tokens_billed"] == cold["prompt_tokens_billed"]
    assert warm["prompt_tokens_computed"] < cold["prompt_tokens_computed"] / 2
    assert warm["answers"] == cold["answers"]


def test_speculation_changes_the_tokens_per_row_step_never_the_answers(capsys):
    args = ["--model", "tiny-random", "--contexts", "2", "--group-sizes", "1,5", "--csa", "off",
            "--max-tokens", "12"]
    off = main([*args, "--speculate", "off"])
    on = main([*args, "--speculate", "auto"])
    assert all(row["tokens_per_row_step"] == 1 for row in off["results"])
    assert all(row["tokens_per_row_step"] >= 1 for row in on["results"])
    assert [row["answers"] for row in on["results"]] == [row["answers"] for row in off["results"]]
    assert "tokens / row-step" in capsys.readouterr().out
