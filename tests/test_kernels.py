"""The CPU kernels of a decoder step against the torch ops they replace, in every variant this
CPU runs."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model.forward import cpu_kernels as kernels
from model.forward.backends import TorchOps
from model.forward.decoder import DecoderForward
from model.weights.tiny import build_tiny_model


def test_the_kernels_build_here(isa):
    """The suite runs where a C compiler is (CI too): the kernels are the CPU path under test,
    each in the variant asked for (the attention's AVX2 loops serve AVX-512 CPUs too)."""
    built = kernels.for_isa(isa)
    assert built is not None
    assert built.variant == ("avx2" if isa == "avx512" else isa)


def test_the_engine_runs_the_variant_the_cap_chooses(capped_isa):
    """GROUPWISE_CPU_ISA caps what a model loaded under it computes with."""
    forward = DecoderForward(build_tiny_model().model)
    assert forward.ops(torch.zeros(1, 8)).kernels is kernels.for_isa(capped_isa)


def test_rms_norm_matches_transformers(isa):
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48)
    x = torch.randn(70, 48)  # more than 64 tokens: the threaded path too
    out = kernels.for_isa(isa).rms_norm(x, norm.weight, norm.variance_epsilon)
    assert torch.allclose(out, norm(x), atol=1e-6, rtol=1e-5)


def test_rotate_and_store_matches_the_torch_ops(isa):
    forward = DecoderForward(build_tiny_model().model)
    heads, kv_heads, dim = forward.num_heads, forward.num_kv_heads, forward.head_dim
    tokens, slots = 5, torch.tensor([7, 3, 11, 0, 9])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    positions = torch.arange(tokens) + 20
    cos, sin = forward.rotary(qkv, positions[None])
    pools = [torch.zeros(kv_heads, 12, dim) for _ in range(4)]
    q_kernel = kernels.for_isa(isa).rotate_and_store(qkv, cos[0], sin[0], pools[0], pools[1],
                                                     slots, heads, dim)
    q_torch = TorchOps(heads, kv_heads, dim).rotate_and_store(qkv, cos[0], sin[0], pools[2],
                                                              pools[3], slots)
    # the same products and sums, each rounded on its own: equal to the bit
    assert torch.equal(q_kernel, q_torch)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert pools[0][:, slots].abs().sum() > 0 and pools[0][:, 1].abs().sum() == 0


def test_silu_and_mul_is_torchs_on_the_halves_of_one_projection(isa):
    """The kernel's exponential is SLEEF's, as torch's vectorized CPU kernels: the same bits
    where torch runs them (its AVX2 and AVX-512 builds, on rows a multiple of 16 wide as a
    model's are; torch's scalar remainder calls libm), close to them anywhere."""
    gate_up = torch.randn(70, 2 * 48) * 8  # more than 64 tokens: the threaded path too
    gate_up[0, :10] = torch.tensor([-200.0, 200.0, -104.5, 104.5, -103.5, 88.8, -88.8, 0.0, -0.0,
                                    1e-30])  # the ends where e^-x is clamped, zero or infinite
    gate, up = gate_up[:, :48], gate_up[:, 48:]
    out = kernels.for_isa(isa).silu_and_mul(gate, up)
    expected = torch.nn.functional.silu(gate) * up
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(out, expected)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
