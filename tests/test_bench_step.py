"""bench.step: the decode-step bench runs on random weights of a known shape, and its bound
counts the bytes a step reads."""

from __future__ import annotations

import json

from bench import step
from model.engine.grouped_engine import GroupedEngine
from model.engine.request import Status
from model.weights.shapes import build_random_model
from model.weights.tiny import build_tiny_model, build_tiny_tokenizer


def test_weight_bytes_count_the_input_embeddings_only_when_they_are_the_lm_head():
    def every(model) -> int:  # parameters (a tied one once) and buffers (rotary frequencies)
        return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])

    tied = build_tiny_model().model
    assert step.weight_bytes(tied) == every(tied)
    untied = build_random_model("qwen2-tiny", build_tiny_tokenizer(), "cpu", tied.dtype).model
    assert step.weight_bytes(untied) == every(untied) - untied.get_input_embeddings().weight.nbytes


def test_the_bench_times_a_random_shape_and_writes_its_report(tmp_path, capsys):
    report_file = tmp_path / "step.json"
    step.main(["--shape", "qwen2-tiny", "--tokenizer", "tiny-random", "--device", "cpu",
               "--rows", "1,2", "--steps", "2", "--prefill-tokens", "300",
               "--json", str(report_file)])
    report = json.loads(report_file.read_text())
    assert [row["rows"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["engine_ms"] > 0 and row["bound_ms"] > 0
    assert report["long_prefill"]["tokens"] == 300 and report["long_prefill"]["tokens_per_s"] > 0
    assert "| 2 |" in capsys.readouterr().out


def test_the_bench_reports_the_tokens_a_row_writes_per_step(capsys):
    plain = step.main(["--model", "tiny-random", "--rows", "1,2", "--steps", "3"])
    assert [row["tokens_per_row_step"] for row in plain["rows"]] == [1, 1]
    speculating = step.main(["--model", "tiny-random", "--rows", "1", "--steps", "3",
                             "--speculate"])
    (row,) = speculating["rows"]
    assert row["tokens_per_row_step"] >= 1
    assert row["engine_tokens_per_s"] == 1000 * row["tokens_per_row_step"] / row["engine_ms"]
    assert "speculation on" in capsys.readouterr().out


def test_every_row_fits_the_pool_together_whether_it_speculates_or_not():
    """A row's worst case is reserved when it is admitted: rows that did not fit together would
    never all decode, and the bench would wait for them forever."""
    tiny = build_tiny_model()
    rows = [[5 + i] * 40 for i in range(8)]
    for speculate in (False, True):
        engine = GroupedEngine(tiny.model, tiny.tokenizer, kv_cache_mb=0.5, speculate=speculate)
        members = step.decoding(engine, rows, steps=20)
        assert all(m.status is Status.DECODE for m in members)
        reserved = sum(len(m.prompt_ids) + m.params.max_tokens for m in members)
        assert reserved <= engine.limits.kv_capacity
        step.finish(engine, members)
