"""All of a CPU step's layers in one C call (model.forward.cpu_layers) against the same ops
called one by one from Python: the same bits, in every step the engine runs (decode rows,
prompt chunks, both at once) and in every kernel variant this CPU runs."""

from __future__ import annotations

import torch

from model.engine.grouped_engine import GroupedEngine
from model.engine.request import Status
from model.forward.decoder import DecoderForward
from model.weights.loading import load_model
from tests.test_engine import make_groups


def test_int4_layers_run_in_one_call_and_other_formats_op_by_op():
    assert DecoderForward(load_model("tiny-random", device="cpu", weights="int4").model
                          ).layer_stack is not None
    for weights in ("loaded", "bf16"):
        loaded = load_model("tiny-random", device="cpu", weights=weights)
        assert DecoderForward(loaded.model).layer_stack is None
    int4 = load_model("tiny-random", device="cpu", weights="int4")
    assert DecoderForward(int4.model, whole_layers=False).layer_stack is None


def test_one_call_computes_what_the_ops_do_one_by_one(capped_isa):
    loaded = load_model("tiny-random", device="cpu", weights="int4")
    engine = GroupedEngine(loaded.model, loaded.tokenizer, max_prefill_tokens=24)
    whole, by_op = engine.forward, DecoderForward(loaded.model, whole_layers=False)
    steps = []

    def both(step, kv):
        kv_by_op = kv.clone()
        out = whole(step, kv)
        assert torch.equal(out, by_op(step, kv_by_op))
        assert torch.equal(kv, kv_by_op)  # the same keys and values, in the same slots
        steps.append((step.num_decode_rows, len(step.token_ids)))
        return out

    engine.forward = both
    engine.forward.scale = whole.scale
    first, later = make_groups(loaded, [3, 2], max_tokens=12)
    for member in first:
        engine.add([member])
    while not all(m.status is Status.DECODE for m in first):
        engine.step()
    engine.add(later)  # its prompts' chunks run beside the first rows' tokens
    while engine.has_work:
        engine.step()
    assert all(m.status is Status.FINISHED for m in first + later)
    assert any(0 < rows < tokens for rows, tokens in steps), "a step of rows and a chunk"
    assert any(rows == 0 and tokens > 8 for rows, tokens in steps), "a prompt chunk alone"
    assert any(rows == tokens > 1 for rows, tokens in steps), "decode rows alone"
