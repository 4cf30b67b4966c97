"""Attention of one step's new tokens over the KV pool, built once per step (`AttentionPlan`) and
applied in every layer (`attend`).

Decode rows (one new token each) read their keys in two kinds of parts:
  - shared extents: the prefix-cache nodes on a row's path (system prompt, passage, ...). Rows
    are ordered so that the rows under one node are contiguous; their queries attend the
    node's extent together, in one call over one copy of its KV (Hydragen / FlashInfer cascade);
  - the tail: the row's own tokens (the rest of its prompt and what it generated), gathered
    for all rows at once into one padded batch.
The parts are merged exactly through their log-sum-exp: with LSE_i and softmax output o_i of
each part, LSE = logsumexp_i LSE_i and o = sum_i exp(LSE_i - LSE) o_i.

Prefill blocks (a chunk of one sequence's tokens) gather their context and attend it with a
causal mask over the chunk: prefill is bound by arithmetic, not by reading the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, scale: float):
    """Softmax attention that also returns the log-sum-exp of each query's scores, which the
    cascade merge needs. q [B, H, Q, D], k / v [B, H, L, D], mask additive [B, 1, Q, L] or
    None -> (out [B, H, Q, D], lse [B, H, Q] in fp32). On a CPU, torch's fused flash kernel."""
    if q.device.type == "cpu":
        cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return cpu_flash(q, k, v, attn_mask=mask, scale=scale)
    return plain_attention_with_lse(q, k, v, mask, scale)


def plain_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None, scale: float):
    """`attention_with_lse` in plain tensor ops, for devices without the CPU kernel."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    return weights @ v, lse


@dataclass(frozen=True)
class SharedExtent:
    start: int  # pool slots [start, start + length)
    length: int
    first_row: int  # decode rows [first_row, end_row) attend it
    end_row: int
    depth: int  # its index among the parts of those rows


@dataclass(frozen=True)
class DecodePlan:
    num_rows: int  # decode tokens are the first num_rows tokens of the step
    shared: tuple[SharedExtent, ...]
    num_parts: int  # deepest path + 1 (the tail)
    tail_index: torch.Tensor  # [R, T] pool slots of each row's own tokens (padded)
    tail_mask: torch.Tensor  # [R, 1, 1, T] additive: 0 for real slots, -inf for padding


@dataclass(frozen=True)
class PrefillBlock:
    offset: int  # the block's queries are tokens [offset, offset + n) of the step
    n: int
    key_index: torch.Tensor  # [L] pool slots it attends: its context, then its own tokens
    mask: torch.Tensor  # [n, L] bool, True where query i may attend key j


@dataclass(frozen=True)
class AttentionPlan:
    decode: DecodePlan | None
    prefill: tuple[PrefillBlock, ...]
    scale: float


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           plan: AttentionPlan) -> torch.Tensor:
    """q: [T, Hq, D] (rotated) for the step's tokens, whose keys and values are already in the
    pool; keys / values: [Hkv, slots, D] of one layer. Returns [T, Hq, D]."""
    parts = []
    if plan.decode is not None:
        parts.append(_decode(q[: plan.decode.num_rows], keys, values, plan.decode, plan.scale))
    for block in plan.prefill:
        parts.append(_prefill(q[block.offset : block.offset + block.n], keys, values, block,
                              plan.scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: DecodePlan,
            scale: float) -> torch.Tensor:
    rows, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[0]
    per_kv = num_heads // num_kv_heads
    grouped = q.view(rows, num_kv_heads, per_kv, head_dim)  # query heads sharing a KV head
    outputs = q.new_zeros(plan.num_parts, rows, num_kv_heads, per_kv, head_dim)
    lses = torch.full((plan.num_parts, rows, num_kv_heads, per_kv), float("-inf"),
                      dtype=torch.float32, device=q.device)
    for part in plan.shared:
        count = part.end_row - part.first_row
        # every (row, query head) of the rows under this node is one query of one call
        queries = grouped[part.first_row : part.end_row].permute(1, 0, 2, 3)
        queries = queries.reshape(1, num_kv_heads, count * per_kv, head_dim)
        end = part.start + part.length
        out, lse = attention_with_lse(queries, keys[None, :, part.start : end],
                                      values[None, :, part.start : end], None, scale)
        outputs[part.depth, part.first_row : part.end_row] = (
            out[0].view(num_kv_heads, count, per_kv, head_dim).transpose(0, 1))
        lses[part.depth, part.first_row : part.end_row] = (
            lse[0].view(num_kv_heads, count, per_kv).transpose(0, 1))
    tail_keys = keys[:, plan.tail_index].transpose(0, 1)  # [R, Hkv, T, D]
    tail_values = values[:, plan.tail_index].transpose(0, 1)
    out, lse = attention_with_lse(grouped, tail_keys, tail_values, plan.tail_mask, scale)
    outputs[-1], lses[-1] = out, lse
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).to(q.dtype).unsqueeze(-1)
    return (weights * outputs).sum(dim=0).view(rows, num_heads, head_dim)


def _prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block: PrefillBlock,
             scale: float) -> torch.Tensor:
    block_keys = keys[:, block.key_index].unsqueeze(0)  # [1, Hkv, L, D]
    block_values = values[:, block.key_index].unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), block_keys, block_values, attn_mask=block.mask,
        scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
