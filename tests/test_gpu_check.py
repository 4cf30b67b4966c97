"""The GPU check's plan, run dry on a CPU: random weights of a small shape for the step
section, the tiny model for the served burst; and how measured figures meet the targets."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


def test_targets_are_met_from_below_or_above_as_each_one_needs():
    report = {"rows": [{"rows": 1, "engine_ms": 5.0}, {"rows": 64, "engine_ms": 12.5}],
              "profile": [{"rows": 32, "gpu_busy_share": 0.9}],
              "long_prefill": {"tokens_per_s": 14000.0}}
    targets = gpu_check.step_targets(report)
    assert targets["step_ms_1_row"] == {"measured": 5.0, "target": 6.0, "met": True}
    assert not targets["step_ms_64_rows"]["met"]
    assert targets["gpu_busy_share_32_rows"]["met"]
    assert not targets["prefill_tokens_per_s_4096"]["met"]
    assert gpu_check.step_targets({"rows": []})["step_ms_1_row"]["measured"] is None


@pytest.mark.slow
def test_a_dry_run_on_the_cpu_writes_one_report(tmp_path):
    out = tmp_path / "check.json"
    gpu_check.main(["--device", "cpu", "--shape", "qwen2-tiny", "--tokenizer", "tiny-random",
                    "--rows", "1,2", "--sections", "step,serve",
                    "--server-args", "--model tiny-random --csa off", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    step = report["step"]
    assert step["status"] == 0, step["output_tail"]
    assert [row["rows"] for row in step["report"]["rows"]] == [1, 2]
    assert step["targets"]["step_ms_1_row"]["measured"] > 0
    serve = report["serve"]
    assert serve["ready"], serve["server_log_tail"]
    assert serve["burst"]["status"] == 0, serve["burst"]["output_tail"]
    summary = serve["burst"]["report"]["rounds"][0]["summary"]
    assert summary["completed"] == 40 and summary["failed"] == 0  # 8 passages x 5 questions
