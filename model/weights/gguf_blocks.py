"""A GGUF's quantized blocks of 32 weights: reading them, making them, and the linear layers
that multiply by them with the C kernel (`block_matmul.c`, where the packed layouts are
described).

Q4_1 (the embedded model's linears): w = d * q + m; fp16 d and m, then 16 bytes in which byte j
holds q[j] (low nibble) and q[j + 16] (high nibble), q in 0..15.
Q8_0 (its LM head, tied to the embeddings): w = d * q; fp16 d, then 32 signed bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from model.weights import block_matmul

GROUP_SIZE = 32  # weights per block
Q4_1_BYTES, Q8_0_BYTES = 20, 34  # one block in a GGUF
COLUMNS = 16  # output columns of one group of the packed layout (block_matmul.c)
PACKED_LAYOUT = 1  # the packed layouts' version: packed blocks kept on disk name it


def unpack_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows -> q [N, K] int32 in 0..15, d and m [N, K/32] fp32; w = d * q + m."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [N, blocks, 32]
    q = torch.from_numpy(q.reshape(rows, -1).astype(np.int32))
    return q, torch.from_numpy(d), torch.from_numpy(m)


def quantize_q4_1(weight: torch.Tensor) -> np.ndarray:
    """fp32 [N, K] -> Q4_1 rows as llama.cpp's quantizer makes them (per block of 32:
    m = min, d = (max - min) / 15, q = round((w - m) / d)); for models that come without a
    GGUF, and for tests."""
    rows = weight.shape[0]
    blocks = weight.detach().float().reshape(rows, -1, GROUP_SIZE)
    low, high = blocks.amin(-1), blocks.amax(-1)
    d = ((high - low) / 15).to(torch.float16)
    m = low.to(torch.float16)
    safe_d = torch.where(d == 0, torch.ones_like(d), d).float()
    q = ((blocks - m.float()[..., None]) / safe_d[..., None]).round().clamp(0, 15)
    q = q.to(torch.uint8).numpy()
    packed = q[..., :16] | (q[..., 16:] << 4)
    header = np.concatenate([d.numpy()[..., None].view(np.uint8),
                             m.numpy()[..., None].view(np.uint8)], axis=-1)
    return np.concatenate([header.reshape(rows, -1, 4), packed], axis=-1).reshape(rows, -1)


def unpack_q8_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows -> q [N, K] int32 in -127..127 and d [N, K/32] fp32; w = d * q."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1).astype(np.int32)
    return torch.from_numpy(q), torch.from_numpy(d)


def quantize_q8_0(weight: torch.Tensor) -> np.ndarray:
    """fp32 [N, K] -> Q8_0 rows as llama.cpp's quantizer makes them (per block of 32:
    d = max |w| / 127, q = round(w / d))."""
    rows = weight.shape[0]
    blocks = weight.detach().float().reshape(rows, -1, GROUP_SIZE)
    d = (blocks.abs().amax(-1) / 127).to(torch.float16)
    safe_d = torch.where(d == 0, torch.ones_like(d), d).float()
    q = (blocks / safe_d[..., None]).round().clamp(-127, 127).to(torch.int8).numpy()
    header = d.numpy()[..., None].view(np.uint8)
    return np.concatenate([header, q.view(np.uint8)], axis=-1).reshape(rows, -1)


def _column_groups(values: np.ndarray, dtype) -> np.ndarray:
    """[N, ...] -> [N / 16, 16, ...] in `dtype`, N padded with zeros to a multiple of 16."""
    groups = -(-values.shape[0] // COLUMNS)
    padded = np.zeros((groups * COLUMNS, *values.shape[1:]), dtype)
    padded[: values.shape[0]] = values
    return padded.reshape(groups, COLUMNS, *values.shape[1:])


def _as_bytes(array: np.ndarray) -> np.ndarray:
    """[G, blocks, ...] -> [G, blocks, bytes]: each block's part of the packed layout."""
    array = np.ascontiguousarray(array)
    return array.view(np.uint8).reshape(*array.shape[:2], -1)


def pack_q4_1(raw: np.ndarray) -> torch.Tensor:
    """Q4_1 rows [N, K/32 * 20] -> the kernel's layout: per group of 16 columns and block, the
    4 pairs of 64 nibble bytes, then the 16 d and the 16 m (fp16)."""
    q, d, m = unpack_q4_1(raw)
    blocks = d.shape[1]
    # k = 32 block + 8 pair + 4 half + j; half 0 in the low nibble, half 1 in the high one
    q = _column_groups(q.numpy().reshape(-1, blocks, 4, 2, 4), np.uint8)
    q = q.transpose(0, 2, 3, 1, 5, 4)  # [G, block, pair, column, j, half]
    nibbles = q[..., 0] | (q[..., 1] << 4)
    scales = np.stack([_column_groups(d.numpy(), np.float16),
                       _column_groups(m.numpy(), np.float16)], axis=2)  # [G, 16, 2, blocks]
    packed = [_as_bytes(nibbles), _as_bytes(scales.transpose(0, 3, 2, 1))]
    return torch.from_numpy(np.concatenate(packed, axis=-1))


def pack_q8_0(raw: np.ndarray) -> torch.Tensor:
    """Q8_0 rows [N, K/32 * 34] -> the kernel's layout: per group of 16 columns and block, the 8
    quads of 64 bytes, the 16 d (fp16), then the 16 columns' -128 sum q (int32)."""
    q, d = unpack_q8_0(raw)
    blocks = d.shape[1]
    q = _column_groups(q.numpy().reshape(-1, blocks, 8, 4), np.int8)  # [G, 16, b, quad, j]
    shift = -128 * q.sum(axis=(3, 4), dtype=np.int32)  # [G, 16, blocks]
    d = _column_groups(d.numpy(), np.float16)
    packed = [_as_bytes(q.transpose(0, 2, 3, 1, 4)), _as_bytes(d.transpose(0, 2, 1)),
              _as_bytes(shift.transpose(0, 2, 1))]
    return torch.from_numpy(np.concatenate(packed, axis=-1))


def unpack_packed_q4_1(packed: np.ndarray) -> np.ndarray:
    """`pack_q4_1`'s layout -> the weights [N padded to 16, K] fp32."""
    groups, blocks = packed.shape[:2]
    nibbles = packed[..., : 4 * 64].reshape(groups, blocks, 4, COLUMNS, 4)
    q = np.stack([nibbles & 0x0F, nibbles >> 4], axis=-1)  # pair, column, j, half
    q = q.transpose(0, 3, 1, 2, 5, 4).reshape(groups * COLUMNS, blocks, GROUP_SIZE)
    d_m: np.ndarray = packed[..., 4 * 64 :].copy().view(np.float16).astype(np.float32)
    d_m = d_m.reshape(groups, blocks, 2, COLUMNS).transpose(2, 0, 3, 1)
    d_m = d_m.reshape(2, groups * COLUMNS, blocks, 1)
    return (d_m[0] * q + d_m[1]).reshape(groups * COLUMNS, -1)


def unpack_packed_q8_0(packed: np.ndarray) -> np.ndarray:
    """`pack_q8_0`'s layout -> the weights [N padded to 16, K] fp32."""
    groups, blocks = packed.shape[:2]
    q: np.ndarray = packed[..., : 8 * 64].copy().view(np.int8)
    q = q.reshape(groups, blocks, 8, COLUMNS, 4)
    q = q.transpose(0, 3, 1, 2, 4).reshape(groups * COLUMNS, blocks, GROUP_SIZE)
    d: np.ndarray = packed[..., 8 * 64 : 8 * 64 + 2 * COLUMNS].copy().view(np.float16)
    d = d.astype(np.float32).transpose(0, 2, 1).reshape(groups * COLUMNS, blocks, 1)
    return (d * q).reshape(groups * COLUMNS, -1)


class _BlockProduct(torch.autograd.Function):
    """The kernel's product, differentiable in x (training a head on top of the LM head): the
    gradient is the exact product's, W^T grad, as if x were not rounded to 8 bits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dense_weight(), None


class BlockLinear(nn.Module):
    """y = x W^T (+ b) with W in a GGUF's quantized blocks, as they are in the file, multiplied by
    the C kernel: as in llama.cpp, each row of x is rounded to 8 bits per block of 32 (scale
    max |x| / 127), so a block's dot product is exact integer arithmetic. x and y are fp32, and
    each row's output depends on that row alone. `kernels`: the built kernels to multiply with
    (default: those of the instruction set `model.native` chooses)."""

    # set by each format: bytes of one GGUF block, its repacking and the way back to weights
    # ([N / 16, K / 32, bytes] -> [N padded, K] fp32), the kernel's function that multiplies it
    block_bytes: int
    pack: Callable[[np.ndarray], torch.Tensor]
    unpack: Callable[[np.ndarray], np.ndarray]
    multiply: Callable[[block_matmul.BlockMatmul, torch.Tensor, torch.Tensor, int], torch.Tensor]

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None,
                 kernels: block_matmul.BlockMatmul | None = None):
        super().__init__()
        kernels = kernels or block_matmul.for_isa()
        if kernels is None:
            raise RuntimeError("the quantized-block kernels need a C compiler")
        self.register_buffer("packed", packed)
        self.out_features, self.in_features = out_features, in_features
        self.bias = bias
        self.kernels = kernels
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_gguf(cls, raw: np.ndarray, bias: torch.Tensor | None = None,
                  kernels: block_matmul.BlockMatmul | None = None) -> BlockLinear:
        """raw: [N, K/32 * block bytes] bytes of a GGUF tensor, one output row per line."""
        in_features = raw.shape[1] // cls.block_bytes * GROUP_SIZE
        return cls(cls.pack(raw), raw.shape[0], in_features, bias, kernels)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 times the weights, without the bias: [M, N] fp32."""
        return self.multiply(self.kernels, x, self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.requires_grad and torch.is_grad_enabled():
            y = _BlockProduct.apply(flat, self)
        else:
            y = self.product(flat)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weights this layer multiplies by, [N, K] fp32: exactly the GGUF's."""
        return torch.from_numpy(self.unpack(self.packed.numpy())[: self.out_features])

    def dense_weight(self) -> torch.Tensor:
        """`dequantized()`, kept after the first call (for gradients)."""
        if self._dense is None:
            self._dense = self.dequantized()
        return self._dense


class Q4_1Linear(BlockLinear):
    block_bytes = Q4_1_BYTES
    pack, unpack = staticmethod(pack_q4_1), staticmethod(unpack_packed_q4_1)
    multiply = staticmethod(block_matmul.BlockMatmul.q4_1)


class Q8_0Linear(BlockLinear):
    block_bytes = Q8_0_BYTES
    pack, unpack = staticmethod(pack_q8_0), staticmethod(unpack_packed_q8_0)
    multiply = staticmethod(block_matmul.BlockMatmul.q8_0)
