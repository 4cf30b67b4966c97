"""Attention over the KV pool on its own: the C kernel and torch's path against one softmax over
each token's gathered keys, and the kernel's promise that a token's output depends only on its
query and its keys."""

from __future__ import annotations

import torch

from model.forward import cpu_kernels
from model.forward.attention import AttentionPlan, Span, attend_with_torch

HEADS, KV_HEADS, DIM, SLOTS = 6, 2, 16, 160
SCALE = DIM**-0.5


def pool(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, SLOTS, DIM, generator=generator)
    values = torch.randn(KV_HEADS, SLOTS, DIM, generator=generator)
    return keys, values


def attend(q: torch.Tensor, keys, values, plan: AttentionPlan, isa: str) -> torch.Tensor:
    """The C kernel, in the variant of `isa`."""
    kernels = cpu_kernels.for_isa(isa)
    return kernels.attend_spans(q, keys, values, *plan.extents.as_tuple(), plan.scale)


def reference(q: torch.Tensor, keys, values, plan: AttentionPlan) -> torch.Tensor:
    """Each token alone, in float64: softmax over its gathered keys, GQA by repeating kv heads."""
    out = torch.empty_like(q)
    for span in plan.spans:
        for i in range(span.n):
            slots = [s for start, n in span.extents_of(i) for s in range(start, start + n)]
            k = keys[:, slots].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
            v = values[:, slots].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
            token_q = q[span.offset + i].double()  # [H, D]
            weights = torch.softmax((k @ token_q[:, :, None])[..., 0] * SCALE, dim=-1)
            out[span.offset + i] = (weights[:, None, :] @ v)[:, 0].float()
    return out


def mixed_plan() -> AttentionPlan:
    """Two decode rows sharing a two-node prefix, one with its own prefix, and a prefill chunk
    of four tokens continuing a cached context."""
    return AttentionPlan.of((
        Span(0, 1, ((0, 10), (10, 5)), 40, 2),
        Span(1, 1, ((0, 10), (10, 5)), 44, 0),
        Span(2, 1, ((20, 7),), 48, 5),
        Span(3, 4, ((0, 10),), 56, 3),
    ), SCALE)


def test_kernel_matches_one_softmax_per_token(isa):
    keys, values = pool()
    q = torch.randn(7, HEADS, DIM, generator=torch.Generator().manual_seed(1))
    plan = mixed_plan()
    assert torch.allclose(attend(q, keys, values, plan, isa), reference(q, keys, values, plan),
                          atol=1e-5)


def test_torch_path_matches_one_softmax_per_token():
    keys, values = pool()
    q = torch.randn(7, HEADS, DIM, generator=torch.Generator().manual_seed(1))
    plan = mixed_plan()
    assert torch.allclose(attend_with_torch(q, keys, values, plan),
                          reference(q, keys, values, plan), atol=1e-5)


def test_a_tokens_output_depends_only_on_its_query_and_keys(isa):
    """Bit for bit: alone or beside other tokens, with its prefix in one extent or split across
    nodes at another point, or its keys copied to other slots."""
    keys, values = pool()
    q = torch.randn(3, HEADS, DIM, generator=torch.Generator().manual_seed(2))
    alone = attend(q[:1], keys, values, AttentionPlan.of((Span(0, 1, ((0, 12),), 40, 3),),
                                                      SCALE), isa)
    batched = attend(q, keys, values, AttentionPlan.of((
        Span(0, 1, ((0, 5), (5, 7)), 40, 3),
        Span(1, 1, ((0, 5), (20, 9)), 44, 1),
        Span(2, 1, ((30, 2),), 48, 0),
    ), SCALE), isa)
    assert torch.equal(alone[0], batched[0])
    moved_keys, moved_values = keys.clone(), values.clone()
    moved_keys[:, 50:62], moved_values[:, 50:62] = keys[:, 0:12], values[:, 0:12]
    moved = attend(q[:1], moved_keys, moved_values, AttentionPlan.of(
        (Span(0, 1, ((50, 3), (53, 9)), 40, 3),), SCALE), isa)
    assert torch.equal(alone[0], moved[0])


def test_a_prefill_chunk_equals_the_same_tokens_decoded_one_by_one(isa):
    """Bit for bit, with the chunk longer than the kernel's tile of tokens (8) and its keys
    longer than its block of keys (64)."""
    keys, values = pool()
    q = torch.randn(11, HEADS, DIM, generator=torch.Generator().manual_seed(3))
    chunk = attend(q, keys, values, AttentionPlan.of((Span(0, 11, ((0, 70),), 100, 2),), SCALE),
                   isa)
    one_by_one = [attend(q[i : i + 1], keys, values,
                         AttentionPlan.of((Span(0, 1, ((0, 70),), 100, 2 + i),), SCALE), isa)
                  for i in range(11)]
    assert torch.equal(chunk, torch.cat(one_by_one))
    assert torch.allclose(chunk, reference(q, keys, values, AttentionPlan.of(
        (Span(0, 11, ((0, 70),), 100, 2),), SCALE)), atol=1e-5)
