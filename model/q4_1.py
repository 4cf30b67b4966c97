"""Q4_1 blocks, the GGUF format of the embedded model's linears: reading them, making them, and
the linear layer that multiplies by them with the C kernel (`model/q4_1_matmul.c`).

A block is 32 weights w = d * q + m: fp16 d and m, then 16 bytes in which byte j holds q[j]
(low nibble) and q[j + 16] (high nibble), q in 0..15.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model import kernels

GROUP_SIZE = 32  # weights per block
BLOCK_BYTES = 20
COLUMNS = 16  # output columns the kernel computes together (one AVX-512 register of floats)


def unpack_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows -> q [N, K] int32 in 0..15, d and m [N, K/32] fp32; w = d * q + m."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES)
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


def pack_columns(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 rows [N, K/32 * 20] -> the kernel's layout (see q4_1_matmul.c): nibbles
    [N/16, K/32, 4 pairs, 16 columns, 4] uint8 and scales [N/16, K/32, (d, m), 16] fp16 bits as
    int16, N padded to a multiple of 16 with zero weights."""
    q, d, m = unpack_q4_1(raw)
    rows, k = q.shape
    groups, blocks = -(-rows // COLUMNS), k // GROUP_SIZE
    padded = np.zeros((groups * COLUMNS, k), np.uint8)
    padded[:rows] = q.numpy()
    # k = 32 block + 8 pair + 4 half + j; the low nibble holds half 0, the high nibble half 1
    split = padded.reshape(groups, COLUMNS, blocks, 4, 2, 4).transpose(0, 2, 3, 1, 5, 4)
    nibbles = split[..., 0] | (split[..., 1] << 4)
    scales = np.zeros((2, groups * COLUMNS, blocks), np.float16)
    scales[0, :rows], scales[1, :rows] = d.numpy(), m.numpy()
    scales = scales.reshape(2, groups, COLUMNS, blocks).transpose(1, 3, 0, 2)
    return (torch.from_numpy(np.ascontiguousarray(nibbles)),
            torch.from_numpy(np.ascontiguousarray(scales).view(np.int16)))


def unpack_columns(nibbles: torch.Tensor, scales: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    """The weights [N, K] fp32 that `pack_columns`'s output stands for."""
    groups, blocks = nibbles.shape[:2]
    split = nibbles.numpy()
    q = np.stack([split & 0x0F, split >> 4], axis=-1)  # [G, blocks, pair, column, j, half]
    q = q.transpose(0, 3, 1, 2, 5, 4).reshape(groups * COLUMNS, blocks, GROUP_SIZE)
    d_m = scales.numpy().view(np.float16).astype(np.float32)  # [G, blocks, 2, column]
    d_m = d_m.transpose(2, 0, 3, 1).reshape(2, groups * COLUMNS, blocks, 1)
    weights = d_m[0] * q + d_m[1]
    return torch.from_numpy(weights.reshape(groups * COLUMNS, -1)[:out_features])


class Q4_1Linear(nn.Module):
    """y = x W^T (+ b) with W the Q4_1 blocks themselves, multiplied by the C kernel. As in
    llama.cpp, each row of x is rounded to 8 bits per block of 32 (scale max |x| / 127), so a
    block's dot product is exact integer arithmetic; x and y are fp32, and each row's output
    depends on that row alone. Needs a CPU with AVX-512 VNNI (`kernels.q4_1_matmul_available`)."""

    def __init__(self, raw: np.ndarray, bias: torch.Tensor | None = None):
        super().__init__()
        nibbles, scales = pack_columns(raw)
        self.register_buffer("nibbles", nibbles)
        self.register_buffer("scales", scales)
        self.out_features = raw.shape[0]
        self.in_features = raw.shape[1] // BLOCK_BYTES * GROUP_SIZE
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        y = kernels.q4_1_matmul(flat, self.nibbles, self.scales, self.out_features)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weights this layer multiplies by, [N, K] fp32 (exactly the GGUF's)."""
        return unpack_columns(self.nibbles, self.scales, self.out_features)
