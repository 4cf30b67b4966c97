"""A lean forward pass of a Llama-family decoder (Llama, SmolLM2, Qwen2 with its q/k/v biases)
over a loaded transformers model's own modules, reading and writing the KV pool.

One call runs one engine step: the new tokens of every running sequence, flattened into one
batch of T tokens with no padding (decode rows, then prefill chunks). Linear layers, norms and
the MLP see [T, d]; each token's key and value go to its pool slot before attention, so
attention reads everything (old and new) from the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.forward import cpu_kernels
from model.forward.attention import AttentionPlan, attend
from model.weights.formats import joined_projection, split_projection

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class UnsupportedModelError(ValueError):
    """The engine's forward does not know this architecture."""


@dataclass(frozen=True)
class PoolShape:
    """The KV pool this forward reads and writes: kv[layer, 0 = key | 1 = value, kv_head, slot,
    head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True)
class StepInputs:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] pool slot where each token's key and value go
    plan: AttentionPlan
    output_index: torch.Tensor  # [N] which tokens' final hidden states are returned
    num_decode_rows: int  # the first tokens are decode rows' (one each), the rest prompt tokens


@dataclass(frozen=True)
class _Block:
    """One decoder layer's modules, looked up once: nn.Module attribute lookups cost more than
    the arithmetic of a decode step's small ops."""

    input_norm: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # [T, d] -> [T, (Hq + 2 Hkv) * D]
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: Callable[[torch.Tensor], list[torch.Tensor]]
    down_proj: nn.Module
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> _Block:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm,
                   joined_projection([attention.q_proj, attention.k_proj, attention.v_proj]),
                   attention.o_proj, layer.post_attention_layernorm,
                   split_projection([mlp.gate_proj, mlp.up_proj]), mlp.down_proj, mlp.act_fn)


class DecoderForward:
    def __init__(self, model: nn.Module):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"the engine runs Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                f"not {config.model_type!r}")
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError("sliding-window attention is not supported")
        body = model.get_decoder()
        self.embed = body.embed_tokens
        self.blocks = [_Block.of(layer) for layer in body.layers]
        self.norm = body.norm
        self.rotary = body.rotary_emb
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // config.num_attention_heads)
        self.scale = self.head_dim**-0.5
        if self.embed.weight.device.type == "cpu":
            cpu_kernels.available()  # built (or found in the cache) now, not in the first request

    @property
    def pool_shape(self) -> PoolShape:
        return PoolShape(len(self.blocks), self.num_kv_heads, self.head_dim)

    @torch.inference_mode()
    def __call__(self, step: StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """kv: the pool tensor [layers, 2, Hkv, slots, D]. Returns the final normed hidden
        states of the tokens in `step.output_index`, [N, d]."""
        x = self.embed(step.token_ids)  # [T, d]
        cos, sin = self.rotary(x, step.positions[None])  # [1, T, D] each
        cos, sin = cos[0], sin[0]
        # on a CPU in fp32, the C kernels: one call each for a norm, for rotating and storing
        # keys and values, and for attention (the torch ops they replace cost more in calls
        # than in arithmetic)
        fast = cpu_kernels.usable_for(x, self.head_dim)
        norm = _kernel_norm if fast else _module_norm
        for index, block in enumerate(self.blocks):
            keys, values = kv[index, 0], kv[index, 1]  # [Hkv, slots, D]
            qkv = block.qkv(norm(block.input_norm, x))
            if fast:
                q = cpu_kernels.rotate_and_store(qkv, cos, sin, keys, values, step.slots,
                                             self.num_heads, self.head_dim)
            else:
                q = self._rotate_and_store(qkv, cos, sin, keys, values, step.slots)
            out = attend(q, keys, values, step.plan)
            x = x + block.o_proj(out.reshape(x.shape[0], -1))
            gate, up = block.gate_up(norm(block.post_norm, x))
            x = x + block.down_proj(block.act_fn(gate) * up)
        return norm(self.norm, x[step.output_index])

    def _rotate_and_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          keys: torch.Tensor, values: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
        """`cpu_kernels.rotate_and_store` in torch ops."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.num_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        q = _rotate(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = _rotate(k.reshape(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
        keys.index_copy_(1, slots, k.transpose(0, 1))
        values.index_copy_(1, slots, v.reshape(num_tokens, self.num_kv_heads,
                                               self.head_dim).transpose(0, 1))
        return q


def _module_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def _kernel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' `apply_rotary_pos_emb` (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
