"""The rest of a decoder step on a GPU, in Triton: one kernel each where torch takes several
(the residual add with the RMS norm after it; rotating queries and keys and writing keys and
values to the pool; the gated activation). Each rounds where transformers' modules round in
the model's dtype, so the step computes what those modules compute."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMS norm of it) for x, delta [T, d] (delta None: x itself)."""
    num_tokens, dim = x.shape
    residual = x if delta is None else torch.empty_like(x)
    normed = torch.empty_like(x)
    source = x if delta is None else delta
    _add_rms_norm_kernel[(num_tokens,)](
        x, source, residual, normed, weight, eps, x.stride(0), source.stride(0),
        HAS_DELTA=delta is not None, DIM=dim, BLOCK=triton.next_power_of_2(dim))
    return residual, normed


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     num_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) * D]: each token's query, key and value heads side by side; cos /
    sin [T, D]. Writes the rotated keys and the values to pool slots `slots` of keys / values
    [Hkv, slots, D]; returns the rotated queries [T, Hq, D]."""
    num_tokens = qkv.shape[0]
    num_kv_heads = keys.shape[0]
    q = qkv.new_empty(num_tokens, num_heads, head_dim)
    _rotate_and_store_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, q, keys, values, slots, qkv.stride(0), cos.stride(0), sin.stride(0),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF=triton.next_power_of_2(head_dim // 2))
    return q


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [T, I] (views of one fused projection's output)."""
    num_tokens, width = gate.shape
    out = gate.new_empty(num_tokens, width)
    block = 1024
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, block))](
        gate, up, out, gate.stride(0), up.stride(0), WIDTH=width, BLOCK=block)
    return out


@triton.jit
def _add_rms_norm_kernel(X, Source, Residual, Normed, Weight, eps, stride_x, stride_source,
                         HAS_DELTA: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    mask = columns < DIM
    x = tl.load(X + token * stride_x + columns, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(Source + token * stride_source + columns, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(Residual + token * DIM + columns, x, mask=mask)
    wide = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(wide * wide, 0) / DIM + eps)
    normed = (wide * scale).to(x.dtype)
    weight = tl.load(Weight + columns, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(Normed.dtype.element_ty)
    tl.store(Normed + token * DIM + columns, out, mask=mask)


@triton.jit
def _rotate_and_store_kernel(QKV, Cos, Sin, QOut, Keys, Values, Slots, stride_t, stride_cos,
                             stride_sin, stride_kh, stride_ks, stride_vh, stride_vs,
                             NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)  # query heads, then key heads, then value heads
    half = tl.arange(0, HALF)
    mask = half < HEAD_DIM // 2
    at = QKV + token * stride_t + head * HEAD_DIM
    low = tl.load(at + half, mask=mask, other=0.0)
    high = tl.load(at + HEAD_DIM // 2 + half, mask=mask, other=0.0)
    if head >= NUM_HEADS + NUM_KV_HEADS:  # a value head: stored as it is
        slot = tl.load(Slots + token)
        to = Values + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh + slot * stride_vs
        tl.store(to + half, low, mask=mask)
        tl.store(to + HEAD_DIM // 2 + half, high, mask=mask)
    else:
        # x * cos + rotate_half(x) * sin, each product rounded to the model's dtype first
        cos_low = tl.load(Cos + token * stride_cos + half, mask=mask, other=0.0)
        cos_high = tl.load(Cos + token * stride_cos + HEAD_DIM // 2 + half, mask=mask, other=0.0)
        sin_low = tl.load(Sin + token * stride_sin + half, mask=mask, other=0.0)
        sin_high = tl.load(Sin + token * stride_sin + HEAD_DIM // 2 + half, mask=mask, other=0.0)
        dtype = low.dtype
        new_low = ((low.to(tl.float32) * cos_low.to(tl.float32)).to(dtype).to(tl.float32)
                   - (high.to(tl.float32) * sin_low.to(tl.float32)).to(dtype).to(tl.float32))
        new_high = ((high.to(tl.float32) * cos_high.to(tl.float32)).to(dtype).to(tl.float32)
                    + (low.to(tl.float32) * sin_high.to(tl.float32)).to(dtype).to(tl.float32))
        if head < NUM_HEADS:
            to = QOut + (token * NUM_HEADS + head) * HEAD_DIM
        else:
            slot = tl.load(Slots + token)
            to = Keys + (head - NUM_HEADS) * stride_kh + slot * stride_ks
        tl.store(to + half, new_low.to(dtype), mask=mask)
        tl.store(to + HEAD_DIM // 2 + half, new_high.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(Gate, Up, Out, stride_gate, stride_up, WIDTH: tl.constexpr,
                         BLOCK: tl.constexpr):
    token = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < WIDTH
    gate = tl.load(Gate + token * stride_gate + columns, mask=mask, other=0.0)
    up = tl.load(Up + token * stride_up + columns, mask=mask, other=0.0)
    wide = gate.to(tl.float32)
    activated = (wide / (1.0 + tl.exp(-wide))).to(gate.dtype)
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(Out + token * WIDTH + columns, out, mask=mask)
