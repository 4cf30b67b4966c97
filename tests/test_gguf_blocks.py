"""The quantized-block matmul kernel, for Q4_1 (linears) and Q8_0 (LM head): its weight layouts
hold the GGUF's weights exactly, every variant this CPU runs computes what llama.cpp's dot
products of those blocks with 8-bit activations define, and each row's output is the same in any
batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.weights import block_matmul
from model.weights.gguf_blocks import Q4_1Linear, Q8_0Linear, quantize_q4_1, quantize_q8_0
from tests.test_quantized import ggml_dequantize_q4_1


def ggml_dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """The Q8_0 layout read as ggml's dequantize_row_q8_0 does, block by block."""
    rows = []
    for line in raw:
        values = []
        for block in line.reshape(-1, 34):
            d = float(block[0:2].view(np.float16)[0])
            values += [d * float(q) for q in block[2:].view(np.int8)]
        rows.append(values)
    return np.array(rows, dtype=np.float32)


# format -> (layer class, quantizer, reference dequantizer)
FORMATS = {"Q4_1": (Q4_1Linear, quantize_q4_1, ggml_dequantize_q4_1),
           "Q8_0": (Q8_0Linear, quantize_q8_0, ggml_dequantize_q8_0)}


def layer_of(kind: str, rows: int, columns: int, bias=None, seed: int = 0, isa: str = "scalar"):
    generator = torch.Generator().manual_seed(seed)
    layer_class, quantize, _ = FORMATS[kind]
    raw = quantize(torch.randn(rows, columns, generator=generator) * 0.05)
    return layer_class.from_gguf(raw, bias, block_matmul.for_isa(isa))


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, round(x / s) * s with s = max |x| / 127
    (float32 arithmetic, ties to even, as the kernel rounds)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("rows", [48, 40, 3])  # whole groups of 16 columns, and padded ones
def test_the_kernel_layout_holds_the_gguf_weights_exactly(kind, rows):
    layer_class, quantize, dequantize = FORMATS[kind]
    weight = torch.randn(rows, 96)
    raw = quantize(weight)
    reference = torch.from_numpy(dequantize(raw))
    assert (reference - weight).abs().max() < (0.5 if kind == "Q4_1" else 0.05)
    layer = layer_class.from_gguf(raw)
    assert (layer.out_features, layer.in_features) == (rows, 96)
    assert torch.equal(layer.dequantized(), reference)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("shape", [(40, 96), (576, 64), (48, 1536)])
def test_the_kernel_computes_the_blocks_times_8_bit_activations(kind, shape, isa):
    layer = layer_of(kind, *shape, isa=isa)
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


@pytest.mark.parametrize("kind", FORMATS)
def test_each_row_is_computed_the_same_in_any_batch(kind, isa):
    layer = layer_of(kind, 80, 128, isa=isa)
    x = torch.randn(21, 128)  # two full tiles of 8 rows and a partial one
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(21)])
    assert torch.equal(together, alone)
    assert torch.equal(layer(x[5:13]), together[5:13])  # other neighbours, other tile
    assert torch.equal(layer(x.reshape(3, 7, 128)).reshape(21, 80), together)
    assert layer(x[:0]).shape == (0, 80)


def test_a_bias_is_added_and_other_dtypes_come_back_as_they_came():
    bias = torch.randn(32)
    layer, plain = layer_of("Q4_1", 32, 64, bias), layer_of("Q4_1", 32, 64)
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), plain(x) + bias)
    assert plain(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", FORMATS)
def test_gradients_flow_to_the_input_as_through_the_exact_product(kind):
    """A head trained on top of the LM head gets the exact product's gradient."""
    layer = layer_of(kind, 40, 64)
    x = torch.randn(3, 64, requires_grad=True)
    weights = torch.randn(3, 40)
    (layer(x) * weights).sum().backward()
    assert torch.allclose(x.grad, weights @ layer.dequantized(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.detach()))


@pytest.mark.parametrize("kind", FORMATS)
def test_every_variant_computes_the_bits_of_the_portable_one(kind, isa):
    """The shapes of the embedded model's linears and LM head, through the Python layer (the
    C driver of tests/test_kernel_variants.py checks the same on random layouts)."""
    for rows, columns in ((960, 576), (576, 1536), (3072, 576)):
        portable, layer = layer_of(kind, rows, columns), layer_of(kind, rows, columns, isa=isa)
        x = torch.randn(37, columns)
        assert torch.equal(layer(x), portable(x))
        assert torch.equal(layer(x[:1]), portable(x[:1]))


def test_a_kernel_names_the_variant_it_was_built_as(isa):
    assert block_matmul.for_isa(isa).variant == isa
