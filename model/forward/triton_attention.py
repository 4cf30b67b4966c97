"""Attention over the KV pool on a GPU, in Triton, reading every key where it lies in the pool.

The keys of a token are its span's extents (`SpanExtents`): the cache nodes on its sequence's
path, then its own run of slots. The kernels walk a token's keys in *sequence order*, in blocks
of BLOCK_N keys numbered from the sequence's first key, and look each key's slot up in the
extents; so the blocks, and every sum, are the same whatever the extents are (where the cache
split the prefix, where in the pool it lies) and whoever else is in the step. A token's output
depends only on its query and its keys: batched and grouped decoding equal unbatched decoding.

- Decode rows (one token each, the step's first spans): grid (rows, kv heads, NUM_SPLITS). A
  row's keys are cut into NUM_SPLITS parts whose size depends only on the row's own number of
  keys; each program computes one part for the query heads of one kv head (grouped-query: one
  `tl.dot` serves them all), and a second kernel merges the parts by log-sum-exp, in order. The
  grid depends on the number of rows only: a captured CUDA graph replays it.
- Prefill chunks: grid (chunks, blocks of BLOCK_M tokens, kv heads); a token sees the keys up
  to itself. A prompt token always runs here, however the step cut its prompt into chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_SPLITS = 16  # parts of a decode row's keys, computed side by side, merged by log-sum-exp
BLOCK_N = 32  # keys per block
TOKEN_ROWS = 64  # rows of a prefill block's dot: BLOCK_M tokens x the kv head's query heads


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, extents,
           num_decode_rows: int, longest_chunk: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D]; keys / values [Hkv, slots, D] (the pool's layer, head_dim contiguous);
    extents: `attention.SpanExtents` on q's device, the first `num_decode_rows` spans one
    token each. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    if num_decode_rows:
        decode(q[:num_decode_rows], keys, values, extents.starts, extents.lengths,
               extents.firsts, scale, out[:num_decode_rows])
    num_chunks = extents.firsts.shape[0] - 1 - num_decode_rows
    if num_chunks:
        prefill(q, keys, values, extents, num_decode_rows, num_chunks, longest_chunk, scale, out)
    return out


def _block_h(group: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(group))


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
           lengths: torch.Tensor, firsts: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """Rows r < R of q [R, Hq, D] attend extents firsts[r] .. firsts[r + 1] - 1 into out."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[0]
    group = num_heads // num_kv_heads
    partial = torch.empty(num_rows, num_heads, NUM_SPLITS, head_dim, dtype=torch.float32,
                          device=q.device)
    partial_lse = torch.empty(num_rows, num_heads, NUM_SPLITS, dtype=torch.float32,
                              device=q.device)
    _decode_split_kernel[(num_rows, num_kv_heads, NUM_SPLITS)](
        q, keys, values, partial, partial_lse, starts, lengths, firsts, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        GROUP=group, BLOCK_H=_block_h(group, 16), BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=NUM_SPLITS,
        IS_FP32=q.dtype == torch.float32)
    _merge_splits_kernel[(num_rows, num_heads)](
        partial, partial_lse, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=NUM_SPLITS)


def prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, extents,
            first_span: int, num_chunks: int, longest_chunk: int, scale: float,
            out: torch.Tensor) -> None:
    """Spans first_span .. first_span + num_chunks - 1 (`extents`), each token attending its
    span's context and its own keys up to itself."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = keys.shape[0]
    group = num_heads // num_kv_heads
    block_h = _block_h(group, 1)
    block_m = max(1, TOKEN_ROWS // block_h)
    grid = (num_chunks, triton.cdiv(longest_chunk, block_m), num_kv_heads)
    _prefill_kernel[grid](
        q, keys, values, out, extents.starts, extents.lengths, extents.firsts, extents.tokens,
        first_span, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), IS_FP32=q.dtype == torch.float32)


@triton.jit
def _num_keys(lengths, first, last):
    """Sum of lengths[first .. last - 1]: a span's first token's keys."""
    total = tl.full((), 0, tl.int64)
    for e in range(first, last):
        total += tl.load(lengths + e)
    return total


@triton.jit
def _key_slots(index, starts, lengths, first, last):
    """The pool slot of each key index (in sequence order) of a span whose extents are
    first .. last - 1; the last extent runs on past its length (a chunk's later tokens)."""
    slots = tl.zeros_like(index)
    before = tl.full((), 0, tl.int64)
    for e in range(first, last):
        length = tl.load(lengths + e)
        inside = (index >= before) & ((index < before + length) | (e == last - 1))
        slots = tl.where(inside, tl.load(starts + e) + index - before, slots)
        before += length
    return slots


@triton.jit
def _scores(q, k, IS_FP32: tl.constexpr):
    # fp32 stays fp32: TF32 would round queries and keys to 10 bits
    if IS_FP32:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _weighted(p, v, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


@triton.jit
def _fold_block(q, K, V, slots, stride_ks, stride_vs, dims, kv_mask, seen, scale, m, total, acc,
                IS_FP32: tl.constexpr):
    """One block of keys folded into the online softmax of the query rows q: the running max m,
    sum of weights `total` and weighted values acc. K / V: one kv head of the pool; `seen`:
    which (row, key) pairs count."""
    k = tl.load(K + slots[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
    s = tl.where(seen, _scores(q, k, IS_FP32) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    total = total * alpha + tl.sum(p, 1)
    v = tl.load(V + slots[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
    return m_new, total, acc * alpha[:, None] + _weighted(p, v, IS_FP32)


@triton.jit
def _decode_split_kernel(
    Q, K, V, Partial, PartialLse, Starts, Lengths, Firsts, scale,
    stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(Firsts + row)
    last = tl.load(Firsts + row + 1)
    num_keys = _num_keys(Lengths, first, last)
    # the row's own length decides the parts, so the sums never depend on the batch
    split_size = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    begin = split * split_size
    end = tl.minimum(begin + split_size, num_keys)

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(Q + row * stride_qt + (kv_head * GROUP + heads)[:, None] * stride_qh
                + dims[None, :], mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for block in range(begin, end, BLOCK_N):
        index = block + tl.arange(0, BLOCK_N)
        valid = index < end
        slots = _key_slots(index, Starts, Lengths, first, last)
        m, total, acc = _fold_block(
            q, K + kv_head * stride_kh, V + kv_head * stride_vh, slots, stride_ks, stride_vs,
            dims, valid[:, None] & dim_mask[None, :], valid[None, :], scale, m, total, acc,
            IS_FP32)

    out_heads = row * (GROUP * tl.num_programs(1)) + kv_head * GROUP + heads  # [BLOCK_H]
    lse_at = PartialLse + out_heads * NUM_SPLITS + split
    out_at = Partial + (out_heads[:, None] * NUM_SPLITS + split) * HEAD_DIM + dims[None, :]
    # a part past the row's last key (a short row) weighs nothing in the merge
    has_keys = begin < end
    total = tl.where(has_keys, total, 1.0)
    lse = tl.where(has_keys, m + tl.log(total), float("-inf"))
    part = tl.where(has_keys, acc / total[:, None], 0.0)
    tl.store(lse_at, lse, mask=head_mask)
    tl.store(out_at, part, mask=head_mask[:, None] & dim_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    Partial, PartialLse, Out, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    at = row * tl.num_programs(1) + head
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    lse = tl.load(PartialLse + at * NUM_SPLITS + splits)  # [NUM_SPLITS]
    weights = tl.exp(lse - tl.max(lse, 0))  # an empty part (-inf) weighs 0
    parts = tl.load(Partial + (at * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=dims[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(Out + row * stride_ot + head * stride_oh + dims, out.to(Out.dtype.element_ty),
             mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Starts, Lengths, Firsts, Tokens, first_span, scale,
    stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr,
):
    span = first_span + tl.program_id(0)
    block_first = tl.program_id(1) * BLOCK_M
    kv_head = tl.program_id(2)
    span_start = tl.load(Tokens + span)
    num_tokens = tl.load(Tokens + span + 1) - span_start
    if block_first >= num_tokens:
        return
    first = tl.load(Firsts + span)
    last = tl.load(Firsts + span + 1)
    first_keys = _num_keys(Lengths, first, last)  # the span's first token's keys

    # one row of the dot per (token, query head of this kv head)
    rows = tl.arange(0, BLOCK_M * BLOCK_H)
    token = block_first + rows // BLOCK_H
    head = kv_head * GROUP + rows % BLOCK_H
    row_mask = (token < num_tokens) & (rows % BLOCK_H < GROUP)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(Q + (span_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    visible = first_keys + token  # token t sees keys [0, first_keys + t)
    end = first_keys + tl.minimum(block_first + BLOCK_M, num_tokens) - 1
    m = tl.full([BLOCK_M * BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_H, BLOCK_D], tl.float32)
    for block in range(0, end, BLOCK_N):
        index = block + tl.arange(0, BLOCK_N)
        valid = index < end
        slots = _key_slots(index, Starts, Lengths, first, last)
        # a block past a token's last key leaves its sums exactly as they were
        m, total, acc = _fold_block(
            q, K + kv_head * stride_kh, V + kv_head * stride_vh, slots, stride_ks, stride_vs,
            dims, valid[:, None] & dim_mask[None, :], index[None, :] < visible[:, None], scale,
            m, total, acc, IS_FP32)
    out = acc / total[:, None]
    tl.store(Out + (span_start + token)[:, None] * stride_ot + head[:, None] * stride_oh
             + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])
