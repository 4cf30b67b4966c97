"""bench/scale.py: the routings it compares, its table, and one real run on tiny replicas
(each routing on its own freshly started servers, the shipped router included)."""

from __future__ import annotations

import json

import pytest

from bench import scale


def test_the_router_runs_as_shipped_with_only_topology_and_flags_added():
    command = scale.router_command(["http://a:1", "http://b:2"], 8080, 29001,
                                   ("--cache-threshold", "1"))
    assert command[:2] == ["sh", str(scale.ROUTER_SCRIPT)]
    assert command[2:] == ["--worker-urls", "http://a:1", "http://b:2", "--host", "127.0.0.1",
                           "--port", "8080", "--prometheus-host", "127.0.0.1",
                           "--prometheus-port", "29001", "--cache-threshold", "1"]
    # the flags come last: vllm-router takes the last value given, so they override start.sh
    assert "--cache-threshold 0.3" in scale.ROUTER_SCRIPT.read_text()


def test_only_least_busy_switches_prefix_matching_off():
    flags = {routing.name: routing.router_flags for routing in scale.ROUTINGS}
    assert flags == {"cache-aware": (), "least-busy": ("--cache-threshold", "1"),
                     "one-replica": ()}


def test_scenarios_carry_no_group_hints_and_read_their_own_passages():
    cases = scale.cases(8, ["burst", "trickle"])
    assert [case.name for case in cases] == ["burst", "trickle"]
    assert not any(case.hints for case in cases)
    assert scale.case_offsets(cases) == {"burst": 0, "trickle": 8}


def test_table_shows_each_figure_per_scenario_and_routing():
    summary = {"computed_share": 0.2154, "prompt_tokens_billed": 9162,
               "prompt_tokens_computed": 1970, "request_throughput": 9.66,
               "median_ttft_ms": 1012.4, "failed": 0}
    table = scale.format_table([scale.table_row("burst", "cache-aware", summary),
                                scale.table_row("burst", "one-replica",
                                                {**summary, "median_ttft_ms": None})])
    lines = table.splitlines()
    assert lines[0].startswith("| scenario | routing | computed share |")
    assert lines[2] == "| burst | cache-aware | 0.215 | 9,162 | 1,970 | 9.66 | 1012 | 0 |"
    assert lines[3].endswith("| 9.66 | - | 0 |")


@pytest.mark.parametrize("flags", [["--routings", "nginx"], ["--scenarios", "rate"],
                                   ["--replicas", "0"]])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        scale.parse_args(flags)
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_on_tiny_replicas_puts_the_same_work_through_every_routing(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert scale.main(["--server-args", "--model tiny-random --threads 1", "--contexts", "2",
                       "--scenarios", "burst", "--max-tokens", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["routing"] for row in rows] == ["cache-aware", "least-busy", "one-replica"]
    assert all(row["failed"] == 0 for row in rows)
    assert len({row["prompt_tokens_billed"] for row in rows}) == 1  # the same questions
    assert all(0 < row["prompt_tokens_computed"] < row["prompt_tokens_billed"] for row in rows)
    assert "| burst | least-busy |" in capsys.readouterr().out
