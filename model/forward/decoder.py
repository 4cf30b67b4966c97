"""A lean forward pass of a Llama-family decoder (Llama, SmolLM2, Qwen2 with its q/k/v biases)
over a loaded transformers model's own modules, reading and writing the KV pool.

One call runs one engine step: the new tokens of every running sequence, flattened into one
batch of T tokens with no padding (decode rows, then prefill chunks). Linear layers, norms and
the MLP see [T, d]; each token's key and value go to its pool slot before attention, so
attention reads everything (old and new) from the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from model.forward import cpu_kernels
from model.forward.attention import AttentionPlan, SpanExtents
from model.forward.backends import CpuKernels, TorchOps, ops_for
from model.forward.cpu_layers import LayerStack
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

    @property
    def num_decode_rows(self) -> int:
        """The first tokens are decode rows' (one each), the rest prompt tokens."""
        return self.plan.num_decode_rows

    def to(self, device: torch.device) -> StepInputs:
        """The same inputs on `device`, moved in one copy (each copy to a GPU costs a launch)."""
        if device == self.token_ids.device:
            return self
        extents = self.plan.extents
        parts = [self.token_ids, self.positions, self.slots, self.output_index,
                 *extents.as_tuple()]
        token_ids, positions, slots, output_index, *extent_parts = torch.cat(parts).to(
            device).split([len(part) for part in parts])
        plan = replace(self.plan, extents=SpanExtents(*extent_parts))
        return StepInputs(token_ids, positions, slots, plan, output_index)


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
    def __init__(self, model: nn.Module, whole_layers: bool = True):
        """whole_layers: on a CPU, a model of int4 weights runs all its layers in one C call
        (`cpu_layers`; the same bits as op by op, which False keeps)."""
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
        self.gated_silu = getattr(config, "hidden_act", None) in ("silu", "swish")
        self._ops: dict[tuple, TorchOps] = {}
        self.layer_stack: LayerStack | None = None
        if self.embed.weight.device.type == "cpu":
            cpu_kernels.for_isa()  # built (or found in the cache) now, not in the first request
            if whole_layers and self.gated_silu:
                self.layer_stack = LayerStack.of(body.layers)

    @property
    def pool_shape(self) -> PoolShape:
        return PoolShape(len(self.blocks), self.num_kv_heads, self.head_dim)

    @property
    def can_replay(self) -> bool:
        """Whether a step on the model's device and dtype can be captured (and replayed): its
        backend reads the attention plan's extents alone (model.forward.cuda_graphs)."""
        return self.ops(self.embed.weight[:0]).reads_extents_only

    def ops(self, x: torch.Tensor) -> TorchOps:
        """The backend for a step whose activations are x (see `model.forward.backends`)."""
        key = (x.device, x.dtype)
        if key not in self._ops:
            self._ops[key] = ops_for(x, self.num_heads, self.num_kv_heads, self.head_dim,
                                     self.gated_silu)
        return self._ops[key]

    @torch.inference_mode()
    def __call__(self, step: StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """kv: the pool tensor [layers, 2, Hkv, slots, D]; step: on kv's device. Returns the
        final normed hidden states of the tokens in `step.output_index`, [N, d]."""
        x = self.embed(step.token_ids)  # [T, d]
        ops = self.ops(x)
        cos, sin = self.rotary(x, step.positions[None])  # [1, T, D] each
        cos, sin = cos[0], sin[0]
        if self.layer_stack is not None and isinstance(ops, CpuKernels):
            x, delta = self.layer_stack(ops.kernels, x, self.num_heads, kv, cos, sin, step)
        else:
            x, delta = self._layers(ops, x, cos, sin, kv, step)
        return ops.norm(x[step.output_index] + delta[step.output_index], self.norm)

    def _layers(self, ops: TorchOps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: torch.Tensor, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers op by op: (x without the last layer's output, that output)."""
        delta = None  # each block's last output, added to x by the next norm
        for index, block in enumerate(self.blocks):
            keys, values = kv[index, 0], kv[index, 1]  # [Hkv, slots, D]
            x, h = ops.add_norm(x, delta, block.input_norm)
            q = ops.rotate_and_store(block.qkv(h), cos, sin, keys, values, step.slots)
            out = ops.attend(q, keys, values, step.plan)
            x, h = ops.add_norm(x, block.o_proj(out.reshape(x.shape[0], -1)), block.post_norm)
            gate, up = block.gate_up(h)
            delta = block.down_proj(ops.gated(gate, up, block.act_fn))
        assert delta is not None, "a decoder has layers"
        return x, delta
