"""The quantized-block matmuls (`block_matmul.c`, AVX-512 VNNI): x times a GGUF's Q4_1 or Q8_0
blocks, repacked by `model.weights.gguf_blocks`. Where the CPU lacks VNNI or no C compiler
builds the file, `available()` is False and the int4 format runs on torch's kernel instead."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from model.native import INT, INT64, POINTER, build_library

SOURCE = Path(__file__).with_name("block_matmul.c")
SIGNATURES = {
    "q4_1_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "q8_0_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "block_matmul_available": ([], INT),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build_library(SOURCE, SIGNATURES, "int4 weights run on torch's int4 kernel")


def available() -> bool:
    """Whether this CPU runs the quantized-block matmuls (they need AVX-512 VNNI)."""
    library = _library()
    return library is not None and library.block_matmul_available() == 1


def q4_1_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 times Q4_1 weights packed by `gguf_blocks.pack_q4_1`: [M, N] fp32."""
    return _block_matmul(_library().q4_1_matmul, x, packed, out_features)


def q8_0_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 times Q8_0 weights packed by `gguf_blocks.pack_q8_0`: [M, N] fp32."""
    return _block_matmul(_library().q8_0_matmul, x, packed, out_features)


def _block_matmul(function, x: torch.Tensor, packed: torch.Tensor,
                  out_features: int) -> torch.Tensor:
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if x.shape[0] == 0:
        return y
    failed = function(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), out_features,
                      y.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("the quantized matmul kernel could not allocate its scratch memory")
    return y
