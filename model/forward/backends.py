"""Who computes a decoder step's operations around its matmuls: attention over the pool, the
residual add with the RMS norm after it, rotating queries and keys and storing keys and values,
the gated activation. The C kernels on a CPU in fp32, Triton on a GPU, torch ops elsewhere; one
call each where it can be, since on both kinds of machine these ops cost more in calls than in
arithmetic.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from model.forward import cpu_kernels
from model.forward.attention import AttentionPlan, attend_with_torch


class TorchOps:
    """transformers' own arithmetic, op by op: what the other backends are checked against."""

    # whether attention needs nothing but the plan's extents (a captured step has no spans)
    reads_extents_only = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                 norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm of it); delta None: x as it is."""
        x = x if delta is None else x + delta
        return x, self.norm(x, norm)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(x)

    def rotate_and_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor,
                         slots: torch.Tensor) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) * D], cos / sin [T, D]: the keys (rotated) and values go to pool
        slots `slots` of keys / values [Hkv, slots, D]; returns the rotated queries [T, Hq, D]."""
        num_tokens, width = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.num_heads * width, self.num_kv_heads * width,
                             self.num_kv_heads * width], dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        q = _rotate(q.view(num_tokens, self.num_heads, width), cos, sin)
        k = _rotate(k.reshape(num_tokens, self.num_kv_heads, width), cos, sin)
        keys.index_copy_(1, slots, k.transpose(0, 1))
        values.index_copy_(1, slots, v.reshape(num_tokens, self.num_kv_heads,
                                               width).transpose(0, 1))
        return q

    def gated(self, gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
        return act_fn(gate) * up

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               plan: AttentionPlan) -> torch.Tensor:
        """q [T, Hq, D] over keys / values [Hkv, slots, D] of one layer, as `plan` says."""
        return attend_with_torch(q, keys, values, plan)


class CpuKernels(TorchOps):
    """fp32 on a CPU: attention, the norm, rotary + store and the gated SiLU in C
    (`cpu_kernels.c`)."""

    reads_extents_only = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 kernels: cpu_kernels.StepKernels, gated_silu: bool):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.kernels, self.gated_silu = kernels, gated_silu

    def attend(self, q, keys, values, plan) -> torch.Tensor:
        extents = plan.extents
        return self.kernels.attend_spans(q, keys, values, extents.starts, extents.lengths,
                                         extents.firsts, extents.tokens, plan.scale)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return self.kernels.rms_norm(x, norm.weight, norm.variance_epsilon)

    def rotate_and_store(self, qkv, cos, sin, keys, values, slots) -> torch.Tensor:
        return self.kernels.rotate_and_store(qkv, cos, sin, keys, values, slots, self.num_heads,
                                             self.head_dim)

    def gated(self, gate, up, act_fn) -> torch.Tensor:
        if self.gated_silu:
            return self.kernels.silu_and_mul(gate, up)
        return act_fn(gate) * up


class TritonKernels(TorchOps):
    """On a GPU: each op one Triton kernel (`triton_ops`, `triton_attention`)."""

    reads_extents_only = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, gated_silu: bool):
        super().__init__(num_heads, num_kv_heads, head_dim)
        from model.forward import triton_attention, triton_ops

        self.kernels, self.attention, self.gated_silu = triton_ops, triton_attention, gated_silu

    def attend(self, q, keys, values, plan) -> torch.Tensor:
        return self.attention.attend(q, keys, values, plan.extents, plan.num_decode_rows,
                                     plan.longest_chunk, plan.scale)

    def add_norm(self, x, delta, norm) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return self.kernels.add_rms_norm(x, None, norm.weight, norm.variance_epsilon)[1]

    def rotate_and_store(self, qkv, cos, sin, keys, values, slots) -> torch.Tensor:
        return self.kernels.rotate_and_store(qkv, cos, sin, keys, values, slots,
                                             self.num_heads, self.head_dim)

    def gated(self, gate, up, act_fn) -> torch.Tensor:
        if self.gated_silu:
            return self.kernels.silu_and_mul(gate, up)
        return act_fn(gate) * up


def ops_for(x: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
            gated_silu: bool) -> TorchOps:
    """The fastest backend that runs a step whose activations are x."""
    kernels = cpu_kernels.for_isa()
    if kernels is not None and cpu_kernels.usable_for(x, head_dim):
        return CpuKernels(num_heads, num_kv_heads, head_dim, kernels, gated_silu)
    if x.is_cuda and triton_available():
        return TritonKernels(num_heads, num_kv_heads, head_dim, gated_silu)
    return TorchOps(num_heads, num_kv_heads, head_dim)


@functools.cache
def triton_available() -> bool:
    """Triton ships with CUDA builds of torch; CPU-only installs need not have it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' `apply_rotary_pos_emb` (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
