"""The Q4_1 matmul kernel: its weight layout holds the GGUF's weights exactly, it computes what
llama.cpp's Q4_1 x Q8 dot product defines, and each row's output is the same in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import kernels
from model.q4_1 import Q4_1Linear, quantize_q4_1
from tests.test_quantized import ggml_dequantize_q4_1

needs_kernel = pytest.mark.skipif(not kernels.q4_1_matmul_available(),
                                  reason="the Q4_1 kernel needs a CPU with AVX-512 VNNI")


def q4_1_rows(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return quantize_q4_1(torch.randn(rows, columns, generator=generator) * 0.05)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, round(x / s) * s with s = max |x| / 127
    (float32 arithmetic, ties to even, as the kernel rounds)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


@pytest.mark.parametrize("rows", [48, 40, 3])  # whole groups of 16 columns, and padded ones
def test_the_kernel_layout_holds_the_gguf_weights_exactly(rows):
    raw = q4_1_rows(rows, 96)
    layer = Q4_1Linear(raw)
    assert (layer.out_features, layer.in_features) == (rows, 96)
    assert torch.equal(layer.dequantized(), torch.from_numpy(ggml_dequantize_q4_1(raw)))


@needs_kernel
@pytest.mark.parametrize("shape", [(40, 96), (576, 64), (48, 1536)])
def test_the_kernel_computes_the_q4_1_times_q8_dot_products(shape):
    raw = q4_1_rows(*shape)
    layer = Q4_1Linear(raw)
    x = torch.randn(19, shape[1])
    x[3] = 0  # a row of zeros has scale 0 and gives zeros
    x[5, :32] = 0  # so does one block of a row
    expected = quantized_activations(x).double() @ layer.dequantized().double().T
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (19, shape[0])
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert torch.equal(y[3], torch.zeros(shape[0]))
    # the 8-bit rounding of activations is the only approximation of the true product
    exact = x.double() @ layer.dequantized().double().T
    assert (y.double() - exact).abs().max() < 0.02 * exact.abs().max()


@needs_kernel
def test_each_row_is_computed_the_same_in_any_batch():
    layer = Q4_1Linear(q4_1_rows(80, 128))
    x = torch.randn(21, 128)  # two full tiles of 8 rows and a partial one
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(21)])
    assert torch.equal(together, alone)
    assert torch.equal(layer(x[5:13]), together[5:13])  # other neighbours, other tile
    assert torch.equal(layer(x.reshape(3, 7, 128)).reshape(21, 80), together)
    assert layer(x[:0]).shape == (0, 80)


@needs_kernel
def test_a_bias_is_added_and_other_dtypes_come_back_as_they_came():
    bias = torch.randn(32)
    layer, plain = Q4_1Linear(q4_1_rows(32, 64), bias), Q4_1Linear(q4_1_rows(32, 64))
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), plain(x) + bias)
    assert plain(x.to(torch.bfloat16)).dtype == torch.bfloat16
