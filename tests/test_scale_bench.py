"""bench/scale.py: the routings and scenarios it compares, its table, and one real run on tiny
replicas (each routing on its own freshly started servers, the shipped router included)."""

from __future__ import annotations

import json
import re
import subprocess

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
    assert "--cache-threshold 0.6" in scale.ROUTER_SCRIPT.read_text()


def test_routings_differ_from_the_shipped_router_only_in_their_flags():
    flags = {routing.name: routing.router_flags for routing in scale.ROUTINGS}
    assert flags == {
        "cache-aware": (),
        "router-defaults": ("--cache-threshold", "0.3", "--balance-abs-threshold", "64",
                            "--balance-rel-threshold", "1.5"),
        "least-busy": ("--cache-threshold", "1"),
        "one-replica": (),
    }
    assert [routing.behind_router for routing in scale.ROUTINGS] == [True, True, True, False]


def test_router_defaults_are_vllm_routers_own():
    """The `router-defaults` routing states vllm-router's defaults, as its --help gives them."""
    done = subprocess.run([scale.router_env()["VLLM_ROUTER"], "--help"], capture_output=True,
                          text=True, timeout=60)
    defaults = dict(re.findall(r"--(cache-threshold|balance-abs-threshold|balance-rel-threshold)"
                               r" \S+\n(?:.*\n)*?.*?\(default:\s+([\d.]+)\)",
                               done.stdout))
    (routing,) = [r for r in scale.ROUTINGS if r.name == "router-defaults"]
    flags = dict(zip(routing.router_flags[::2], routing.router_flags[1::2]))
    assert {f"--{name}": value for name, value in defaults.items()} == flags


def test_scenarios_carry_no_group_hints_and_read_their_own_passages():
    cases = scale.cases(8, list(scale.SCENARIOS))
    assert [case.name for case in cases] == ["burst", "trickle", "clients", "system-prompt",
                                             "skewed"]
    assert not any(case.hints for case in cases)
    assert scale.case_offsets(cases) == {"burst": 0, "trickle": 8, "clients": 16,
                                         "system-prompt": 24, "skewed": 32}
    by_name = {case.name: scale.load_args(case, "http://u", 0, False, []) for case in cases}
    assert by_name["clients"].scenario == "clients" and by_name["clients"].clients == 4
    assert by_name["system-prompt"].system_prompt_file == str(scale.SYSTEM_PROMPT_FILE)
    assert by_name["skewed"].scenario == "burst" and by_name["skewed"].hot_share == 0.6
    assert all(args.contexts == 8 for args in by_name.values())


def test_requests_per_replica_count_who_answered_idle_replicas_included():
    requests = [{"replica": "replica-2"}, {"replica": "replica-2"}, {"replica": "replica-3"},
                {"replica": None}]  # failed before a replica answered
    assert scale.requests_per_replica(requests, 3) == [0, 2, 1]


def test_table_shows_each_figure_per_scenario_and_routing():
    summary = {"computed_share": 0.2154, "prompt_tokens_billed": 9162,
               "prompt_tokens_computed": 1970, "request_throughput": 9.66,
               "median_ttft_ms": 1012.4, "failed": 0}
    table = scale.format_table([scale.table_row("burst", "cache-aware", summary, [25, 15]),
                                scale.table_row("burst", "one-replica",
                                                {**summary, "median_ttft_ms": None}, [40])])
    lines = table.splitlines()
    assert lines[0].startswith("| scenario | routing | requests per replica | busiest / even |"
                               " computed share |")
    assert lines[2] == ("| burst | cache-aware | 25 / 15 | 1.25 | 0.215 | 9,162 | 1,970 | 9.66 "
                        "| 1012 | 0 |")
    assert lines[3].startswith("| burst | one-replica | 40 | 1.00 |")
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
                       "--scenarios", "skewed", "--max-tokens", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(row["scenario"], row["routing"]) for row in rows] == [
        ("skewed", routing)
        for routing in ("cache-aware", "router-defaults", "least-busy", "one-replica")]
    assert all(row["failed"] == 0 for row in rows)
    assert len({row["prompt_tokens_billed"] for row in rows}) == 1  # the same questions
    assert all(0 < row["prompt_tokens_computed"] < row["prompt_tokens_billed"] for row in rows)
    for row in rows:  # every one of the 10 questions answered, by a replica the run started
        counts = [int(count) for count in row["requests_per_replica"].split(" / ")]
        assert sum(counts) == 10
        assert len(counts) == (1 if row["routing"] == "one-replica" else 2)
    assert result["config"]["router_args"] == ""
    # the passages skewed reads in a whole run: after the 4 scenarios before it, 2 passages each
    assert {tuple(run["config"]["passages"]) for run in result["runs"]} == {(8, 9)}
    assert "| skewed | least-busy |" in capsys.readouterr().out
