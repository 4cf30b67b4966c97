"""The GPU kernels of a decoder step's small ops (Triton) against the torch ops they replace. On
a CPU they run in Triton's interpreter, on a GPU with `--device cuda`."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model.forward import triton_ops
from model.forward.backends import TorchOps
from model.forward.decoder import DecoderForward
from model.weights.tiny import build_tiny_model


def test_add_rms_norm_matches_transformers(device, dtype):
    norm = LlamaRMSNorm(48, eps=1e-5).to(device, dtype)
    norm.weight.data = torch.randn(48).to(device, dtype)
    x, delta = (torch.randn(7, 48).to(device, dtype) for _ in range(2))
    residual, normed = triton_ops.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(residual, x + delta)
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    assert torch.allclose(normed.float(), norm(x + delta).float(), atol=tolerance, rtol=tolerance)
    same, alone = triton_ops.add_rms_norm(x, None, norm.weight, norm.variance_epsilon)
    assert same is x
    assert torch.allclose(alone.float(), norm(x).float(), atol=tolerance, rtol=tolerance)


def test_rotate_and_store_matches_the_torch_ops(device, dtype):
    forward = DecoderForward(build_tiny_model().model)
    heads, kv_heads, dim = forward.num_heads, forward.num_kv_heads, forward.head_dim
    tokens, slots = 5, torch.tensor([7, 3, 11, 0, 9], device=device)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(device, dtype)
    positions = torch.arange(tokens, device=device) + 20
    forward.rotary.to(device)
    cos, sin = (t[0] for t in forward.rotary(qkv, positions[None]))
    pools = [torch.zeros(kv_heads, 12, dim, device=device, dtype=dtype) for _ in range(4)]
    q_kernel = triton_ops.rotate_and_store(qkv, cos, sin, pools[0], pools[1], slots, heads, dim)
    q_torch = TorchOps(heads, kv_heads, dim).rotate_and_store(qkv, cos, sin, pools[2], pools[3],
                                                              slots)
    # the same products and sums, each rounded as torch rounds them
    assert torch.equal(q_kernel, q_torch)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert pools[0][:, slots].abs().sum() > 0 and pools[0][:, 1].abs().sum() == 0


def test_silu_and_mul_reads_the_halves_of_one_projection(device, dtype):
    gate_up = torch.randn(6, 2 * 1500).to(device, dtype)  # wider than one block of columns
    gate, up = gate_up[:, :1500], gate_up[:, 1500:]
    expected = torch.nn.functional.silu(gate) * up
    tolerance = 1e-6 if dtype is torch.float32 else 1e-2
    assert torch.allclose(triton_ops.silu_and_mul(gate, up).float(), expected.float(),
                          atol=tolerance, rtol=tolerance)
