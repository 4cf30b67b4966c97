"""Decode steps from static buffers, padded to a bucket (model.forward.cuda_graphs): on a CPU
they run eagerly, with `--device cuda` they are captured and replayed. Either way a padded step
equals the unpadded one, answers stay those of unbatched decoding, and padding rows never
write a live slot."""

from __future__ import annotations

import torch

import model.engine.grouped_engine as grouped_engine
from model.engine.batch import build_step
from model.engine.grouped_engine import GroupedEngine
from model.engine.interface import EngineOptions, open_engine
from model.engine.request import Member, SamplingParams, Status
from model.engine.scheduler import StepWork
from model.forward.cuda_graphs import DecodeGraphs, bucket_sizes
from tests.test_engine import make_groups, reference_greedy, run


def test_buckets_are_powers_of_two_then_steps_of_sixteen():
    assert bucket_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]


def decoding_engine(tiny) -> GroupedEngine:
    """An engine with five rows decoding: groups of 3, 1 and 1 (prompts of different lengths
    and cache paths)."""
    engine = GroupedEngine(tiny.model, tiny.tokenizer, decode_graph_rows=8)
    for group in make_groups(tiny, [3, 1, 1], max_tokens=20):
        engine.add(group)
    while not engine.scheduler.running or not all(r.member.status is Status.DECODE
                                                  for g in engine.scheduler.running
                                                  for r in g.rows):
        engine.step()
    engine.step()
    return engine


def test_a_padded_step_equals_the_unpadded_one_and_writes_no_live_slot(tiny):
    engine = decoding_engine(tiny)
    rows = engine.scheduler.decoding_rows()
    assert len(rows) == 5  # padded to a bucket of 8
    inputs, _ = build_step(StepWork(rows, []), engine.forward.scale)
    eager_kv, padded_kv = engine.pool.kv.clone(), engine.pool.kv.clone()
    scratch = engine.pool.scratch_slot
    padded_kv[:, :, :, scratch] = 7.0
    eager_kv[:, :, :, scratch] = 7.0
    eager = engine.forward(inputs.to(engine.device), eager_kv)
    graphs = DecodeGraphs(engine.forward, padded_kv, scratch, max_rows=8,
                          capture=engine.device.type == "cuda")
    padded = graphs.run(inputs)
    assert padded.shape == eager.shape
    assert torch.allclose(padded.float(), eager.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.argmax(-1), eager.argmax(-1))
    # the rows' own new slots hold the same keys and values (up to the last bits: a matmul
    # over 8 rows may round apart from one over 5); no other slot changed but the scratch slot
    own = inputs.slots.to(engine.device)
    assert torch.allclose(padded_kv[:, :, :, own].float(), eager_kv[:, :, :, own].float(),
                          atol=1e-5, rtol=1e-5)
    untouched = torch.ones(padded_kv.shape[3], dtype=torch.bool, device=engine.device)
    untouched[own] = False
    untouched[scratch] = False
    assert torch.equal(padded_kv[:, :, :, untouched], eager_kv[:, :, :, untouched])
    assert not torch.equal(padded_kv[:, :, :, scratch], eager_kv[:, :, :, scratch]), (
        "the padding rows wrote the scratch slot")


def test_answers_through_padded_steps_are_those_of_unbatched_decoding(tiny):
    """Nine rows (more than the largest bucket: those steps run as they are) that leave one by
    one, so later steps fill buckets of 8, 4, 2 and 1 with padding."""
    engine = GroupedEngine(tiny.model, tiny.tokenizer, decode_graph_rows=8)
    padded = []
    run_padded = engine.graphs.run
    engine.graphs.run = lambda step: padded.append(step.num_decode_rows) or run_padded(step)
    groups = make_groups(tiny, [5, 1, 3])
    for index, member in enumerate(m for g in groups for m in g):
        member.params = SamplingParams(max_tokens=4 + index)
    results = run(engine, groups)
    for member in (m for g in groups for m in g):
        expected = reference_greedy(tiny.model, member.prompt_ids, member.params.max_tokens,
                                    engine.eos_token_ids)
        assert results[member]["ids"] == expected
    assert set(padded) == set(range(1, 9))


def test_a_lone_row_decodes_the_same_with_and_without_graphs(tiny):
    prompt = make_groups(tiny, [1])[0][0].prompt_ids
    answers = []
    for rows in (0, 4):
        engine = GroupedEngine(tiny.model, tiny.tokenizer, decode_graph_rows=rows)
        member = Member(prompt, SamplingParams(max_tokens=10))
        answers.append(run(engine, [[member]])[member]["ids"])
    assert answers[0] == answers[1]


def test_a_refused_capture_leaves_decode_steps_eager(tiny, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(grouped_engine, "DecodeGraphs", refuse)
    engine = GroupedEngine(tiny.model, tiny.tokenizer, decode_graph_rows=8)
    assert engine.graphs is None
    assert "decode steps run eagerly" in caplog.text
    member = make_groups(tiny, [1], max_tokens=6)[0][0]
    expected = reference_greedy(tiny.model, member.prompt_ids, 6, engine.eos_token_ids)
    assert run(engine, [[member]])[member]["ids"] == expected


def test_a_server_on_a_cpu_decodes_without_graphs(tiny_model):
    """--decode-graph-rows is a GPU's: the padded eager steps above are a check, not a mode."""
    engine = open_engine(tiny_model, None, EngineOptions(decode_graph_rows=8))
    assert engine.graphs is None


def test_a_step_that_verifies_a_proposal_is_left_to_the_eager_forward(tiny):
    """Graphs are captured for one token a row: a verifying row's chunk does not fit them."""
    engine = decoding_engine(tiny)
    rows = engine.scheduler.decoding_rows()
    plain, _ = build_step(StepWork(rows, []), engine.forward.scale)
    verifying, _ = build_step(StepWork(rows, [], {rows[0]: [5, 6]}), engine.forward.scale)
    assert engine.graphs.fits(plain)
    assert not engine.graphs.fits(verifying)
