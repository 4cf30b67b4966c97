"""The GPU attention kernels (Triton) against torch's path and a float64 softmax per token, and
their promise: a token's output depends only on its query and its keys. On a CPU they run in
Triton's interpreter (conftest sets TRITON_INTERPRET), on a GPU with `--device cuda`."""

from __future__ import annotations

import pytest
import torch

from model.forward import triton_attention
from model.forward.attention import AttentionPlan, Span, attend_with_torch

pytestmark = pytest.mark.slow

HEADS, KV_HEADS, SLOTS = 14, 2, 900  # seven query heads share each kv head, as in Qwen2.5-7B


def pool(device, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, SLOTS, dim, generator=generator)
    values = torch.randn(KV_HEADS, SLOTS, dim, generator=generator)
    return keys.to(device), values.to(device)


def queries(device, count: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, HEADS, dim, generator=torch.Generator().manual_seed(seed)).to(device)


def run(q, keys, values, spans, num_decode_rows: int) -> torch.Tensor:
    plan = AttentionPlan.of(spans, q.shape[-1] ** -0.5, num_decode_rows)
    extents = plan.extents
    on_device = type(extents)(*(t.to(q.device) for t in extents.as_tuple()))
    return triton_attention.attend(q, keys, values, on_device, num_decode_rows,
                                   plan.longest_chunk, plan.scale)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit where the kernels are compiled (a GPU). In Triton's interpreter a `tl.dot` is
    NumPy's matmul, whose summation order depends on the BLAS build, the CPU and the shape, so
    there the promise holds to float32 rounding (about 1e-7 for these values of order 1)."""
    if actual.device.type == "cuda":
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def reference(q, keys, values, spans) -> torch.Tensor:
    """Each token alone, in float64: softmax over its gathered keys."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    for span in spans:
        for i in range(span.n):
            slots = [s for start, n in span.extents_of(i) for s in range(start, start + n)]
            k = keys[:, slots].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
            v = values[:, slots].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
            weights = torch.softmax((k @ q[span.offset + i].double()[:, :, None])[..., 0] * scale,
                                    dim=-1)
            out[span.offset + i] = (weights[:, None, :] @ v)[:, 0].to(q.dtype)
    return out


# decode rows: two sharing a two-node prefix, one whose 611 keys fill every split, one with a
# single key; then prefill chunks: one continuing a cached context, one longer than a block of
# tokens, one of a single token
SPANS = (
    Span(0, 1, ((0, 10), (10, 5)), 40, 2),
    Span(1, 1, ((0, 10), (10, 5)), 44, 0),
    Span(2, 1, ((100, 600),), 48, 10),
    Span(3, 1, (), 70, 0),
    Span(4, 4, ((0, 10),), 56, 3),
    Span(8, 40, ((700, 37),), 800, 0),
    Span(48, 1, ((0, 10), (10, 5)), 60, 6),
)


@pytest.mark.parametrize("dim", [16, 24])  # a power of two, and a width the kernel pads
def test_kernels_match_torch_and_one_softmax_per_token(device, dtype, dim):
    """In --dtype (float32 by default; Triton's interpreter has no bfloat16 arithmetic, so
    bfloat16 is checked on a GPU)."""
    keys, values = (t.to(dtype) for t in pool(device, dim))
    q = queries(device, 49, dim).to(dtype)
    out = run(q, keys, values, SPANS, num_decode_rows=4).float().cpu()
    plan = AttentionPlan.of(SPANS, dim**-0.5, 4)
    torch_path = attend_with_torch(q.cpu(), keys.cpu(), values.cpu(), plan).float()
    tolerance = 1e-5 if dtype is torch.float32 else 3e-2
    assert torch.allclose(out, torch_path, atol=tolerance)
    expected = reference(q.float(), keys.float(), values.float(), SPANS).cpu()
    assert torch.allclose(out, expected, atol=tolerance)


def test_a_decode_rows_output_depends_only_on_its_query_and_keys(device):
    """Bit for bit on a GPU (to rounding in the interpreter, see `assert_same`): alone or
    beside other rows, with its prefix in one extent or split across nodes elsewhere, or its
    keys copied to other slots of the pool."""
    keys, values = pool(device, 16)
    q = queries(device, 3, 16, seed=2)
    alone = run(q[:1], keys, values, (Span(0, 1, ((0, 70),), 400, 3),), 1)
    batched = run(q, keys, values, (
        Span(0, 1, ((0, 33), (33, 37)), 400, 3),
        Span(1, 1, ((0, 5), (20, 9)), 44, 1),
        Span(2, 1, ((100, 600),), 48, 0),
    ), 3)
    assert_same(alone[0], batched[0])
    moved_keys, moved_values = keys.clone(), values.clone()
    moved_keys[:, 500:570], moved_values[:, 500:570] = keys[:, 0:70], values[:, 0:70]
    moved = run(q[:1], moved_keys, moved_values, (Span(0, 1, ((500, 3), (503, 67)), 400, 3),), 1)
    assert_same(alone[0], moved[0])


def test_a_prompt_token_does_not_depend_on_how_its_prompt_was_chunked(device):
    """A prompt computed in one chunk, or in two chunks of one step beside a decode row, or its
    last token alone: each token's output is the same, bit for bit on a GPU (see `assert_same`)."""
    keys, values = pool(device, 16)
    q = queries(device, 45, 16, seed=3)
    whole = run(q[1:], keys, values, (Span(0, 44, ((0, 20),), 300, 0),), 0)
    split = run(q, keys, values, (
        Span(0, 1, ((0, 20),), 400, 5),
        Span(1, 13, ((0, 20),), 300, 0),
        Span(14, 31, ((0, 20),), 300, 13),
    ), 1)
    assert_same(whole, split[1:])
    last = run(q[44:], keys, values, (Span(0, 1, ((0, 20),), 300, 43),), 0)
    assert_same(whole[43], last[0])
