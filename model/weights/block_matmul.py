"""The quantized-block matmuls (`block_matmul.c`): x times a GGUF's Q4_1 or Q8_0 blocks,
repacked by `model.weights.gguf_blocks`, in the variant of the instruction set `model.native`
chooses (AVX-512 VNNI, AVX2, NEON or portable C; all compute the same bits). `for_isa()` is None
where no C compiler builds the file."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from model.native import INT, INT64, POINTER, build_library, chosen_isa

SOURCE = Path(__file__).with_name("block_matmul.c")
SIGNATURES = {
    "q4_1_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "q8_0_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "block_matmul_variant": ([], ctypes.c_char_p),
}


class BlockMatmul:
    """One built library of the kernels: `variant` names what it was built as."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        self.variant: str = library.block_matmul_variant().decode()
        # where q4_1_matmul is, for C code that multiplies by it itself (cpu_kernels.c)
        self.q4_1_address: int = ctypes.cast(library.q4_1_matmul, ctypes.c_void_p).value or 0

    def q4_1(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [M, K] fp32 times Q4_1 weights packed by `gguf_blocks.pack_q4_1`: [M, N] fp32."""
        return _multiply(self._library.q4_1_matmul, x, packed, out_features)

    def q8_0(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [M, K] fp32 times Q8_0 weights packed by `gguf_blocks.pack_q8_0`: [M, N] fp32."""
        return _multiply(self._library.q8_0_matmul, x, packed, out_features)


@functools.cache
def _built(isa: str) -> BlockMatmul | None:
    library = build_library(SOURCE, SIGNATURES, "int4 weights are not available", isa)
    return None if library is None else BlockMatmul(library)


def for_isa(isa: str | None = None) -> BlockMatmul | None:
    """The kernels for `isa` (default: `model.native.chosen_isa()`), None without a compiler."""
    return _built(isa or chosen_isa())


def _multiply(function, x: torch.Tensor, packed: torch.Tensor,
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
