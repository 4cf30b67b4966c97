"""The C kernels of a decoder step on a CPU (`cpu_kernels.c`): attention, RMS norm, rotary +
KV store, the gated SiLU, and all of a step's layers in one call, in the variant of the
instruction set `model.native` chooses (AVX2, NEON or portable C; all compute the same bits).
Without a C compiler the step runs on torch ops instead (and says so once in the log).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from model.forward.attention import SpanExtents
from model.native import FLOAT, INT, INT64, POINTER, build_library, chosen_isa

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SIGNATURES: dict[str, tuple[list[Any], Any]] = {  # function -> (argument types, return type)
    "attend_spans": ([POINTER] * 8 + [INT64] * 5 + [FLOAT, INT], INT),
    "rms_norm": ([POINTER] * 3 + [INT64] * 2 + [FLOAT, INT], None),
    "rotate_and_store": ([POINTER] * 3 + [INT64] + [POINTER] * 6 + [INT64] * 5 + [INT], None),
    "silu_and_mul": ([POINTER, INT64, POINTER, INT64, POINTER, INT64, INT64, INT], None),
    "decoder_layers": ([POINTER, POINTER, INT64, POINTER, INT64, INT64, INT64, FLOAT]
                       + [POINTER] * 9 + [INT64] * 5 + [FLOAT, INT], INT),
    "cpu_kernels_variant": ([], ctypes.c_char_p),
}


class StepKernels:
    """One built library of the kernels: `variant` names what it was built as."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        self.variant: str = library.cpu_kernels_variant().decode()

    def attend_spans(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     extent_starts: torch.Tensor, extent_lengths: torch.Tensor,
                     span_extents: torch.Tensor, span_tokens: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """q [T, Hq, D]; keys / values [Hkv, slots, D] (fp32, CPU). Span s is tokens
        span_tokens[s] .. span_tokens[s + 1] - 1 of one sequence; its first token attends the
        slots of extents span_extents[s] .. span_extents[s + 1] - 1, in order, and each next
        token one slot more of the last extent (int64 tensors). The caller guarantees every
        extent lies inside the pool and every token has at least one key."""
        q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads, num_slots, _ = keys.shape
        out = torch.empty_like(q)
        failed = self._library.attend_spans(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
            extent_starts.data_ptr(), extent_lengths.data_ptr(), span_extents.data_ptr(),
            span_tokens.data_ptr(), span_extents.shape[0] - 1, num_heads, num_kv_heads,
            num_slots, head_dim, scale, torch.get_num_threads())
        if failed:
            raise MemoryError("the attention kernel could not allocate its scratch memory")
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' LlamaRMSNorm of x [T, d] (fp32, CPU) in one call."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._library.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0],
                               x.shape[1], eps, torch.get_num_threads())
        return out

    def rotate_and_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                         num_heads: int, head_dim: int) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) * D]: each token's query, key and value heads side by side (one
        fused projection's output); cos / sin [T, D]. Writes the rotated keys and the values to
        pool slots `slots` of keys / values [Hkv, slots, D]; returns the rotated queries
        [T, Hq, D]."""
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        num_tokens, width = qkv.shape
        num_kv_heads, num_slots, _ = keys.shape
        q_out = qkv.new_empty(num_tokens, num_heads, head_dim)
        at = qkv.data_ptr()
        step = qkv.element_size() * head_dim
        self._library.rotate_and_store(
            at, at + step * num_heads, at + step * (num_heads + num_kv_heads), width,
            cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), keys.data_ptr(),
            values.data_ptr(), slots.data_ptr(), num_tokens, num_heads, num_kv_heads, num_slots,
            head_dim, torch.get_num_threads())
        return q_out

    def silu_and_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate and up [T, I] (fp32, CPU; rows may be strided, as two
        halves of one projection's output are), in one call."""
        gate, up = _rows_contiguous(gate), _rows_contiguous(up)
        out = gate.new_empty(gate.shape)
        self._library.silu_and_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0),
                                   out.data_ptr(), gate.shape[0], gate.shape[1],
                                   torch.get_num_threads())
        return out

    def decoder_layers(self, x: torch.Tensor, layers: torch.Tensor, intermediate: int,
                       eps: float, product: int, kv: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, slots: torch.Tensor, extents: SpanExtents,
                       num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer of a step over x [T, d] (fp32, CPU), each op as the methods above compute
        it: (the residual stream without the last layer's MLP output, that output), [T, d]
        each. layers: [L, 10] int64, each layer's weight addresses as `cpu_layers` lays them
        out; product: the address of the block matmul that multiplies them; kv: the pool
        [L, 2, Hkv, slots, D]."""
        assert kv.is_contiguous() and kv.dtype == torch.float32, "the pool as the loop reads it"
        x = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        delta = torch.empty_like(x)
        _, _, num_kv_heads, num_slots, head_dim = kv.shape
        failed = self._library.decoder_layers(
            x.data_ptr(), delta.data_ptr(), x.shape[0], layers.data_ptr(), layers.shape[0],
            x.shape[1], intermediate, eps, product, kv.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), slots.data_ptr(), extents.starts.data_ptr(),
            extents.lengths.data_ptr(), extents.firsts.data_ptr(), extents.tokens.data_ptr(),
            extents.firsts.shape[0] - 1, num_heads, num_kv_heads, num_slots, head_dim, scale,
            torch.get_num_threads())
        if failed:
            raise MemoryError("the decoder layers could not allocate their scratch memory")
        return x, delta


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [T, I] with each row's elements side by side (rows may stand apart)."""
    return x if x.stride(1) == 1 else x.contiguous()


@functools.cache
def _built(isa: str) -> StepKernels | None:
    library = build_library(SOURCE, SIGNATURES, "the decoder step runs on torch ops (slower, "
                            "and batched output may differ from unbatched in the last bits)", isa)
    return None if library is None else StepKernels(library)


def for_isa(isa: str | None = None) -> StepKernels | None:
    """The kernels for `isa` (default: `model.native.chosen_isa()`), None without a compiler."""
    return _built(isa or chosen_isa())


def usable_for(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernels can run this step: fp32 on a CPU, heads a multiple of 8 wide."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and head_dim % 8 == 0
            and for_isa() is not None)
