"""All of a CPU step's decoder layers in one C call (`decoder_layers` in `cpu_kernels.c`), for a
model whose linears are all quantized blocks (the int4 weights) with a gated SiLU MLP.

Op by op, a step makes a dozen calls a layer (norms, projections, rotary, attention, adds, the
activation), some 360 for the embedded model's 30 layers; at one row their Python and torch
overhead cost about as much as the arithmetic. The C loop calls the same functions with the
same arguments, so it computes the same bits as the ops called one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.forward.cpu_kernels import StepKernels
from model.weights.formats import OutputSlice
from model.weights.gguf_blocks import Q4_1Linear

if TYPE_CHECKING:
    from model.forward.decoder import StepInputs


@dataclass(frozen=True)
class LayerStack:
    """The layers' weights as the C loop reads them."""

    table: torch.Tensor  # [L, 10] int64: each layer's addresses (struct layer_weights)
    product: int  # the address of the block matmul all of them use
    intermediate: int
    eps: float
    modules: nn.ModuleList  # keeps what the table points into alive

    @classmethod
    def of(cls, layers: nn.ModuleList) -> LayerStack | None:
        """The stack for these transformers decoder layers (of a gated SiLU MLP), or None when
        some layer is not the shape the C loop computes: q / k / v and gate / up each one Q4_1
        projection, the output and down projections Q4_1, fp32 norms of one epsilon, one
        kernel build."""
        if len(layers) == 0:
            return None
        rows: list[list[int]] = []
        products: set[int] = set()
        epsilons: set[float] = set()
        widths: set[int] = set()
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = _whole(attention.q_proj, attention.k_proj, attention.v_proj)
            gate_up = _whole(mlp.gate_proj, mlp.up_proj)
            linears = [m for m in (qkv, attention.o_proj, gate_up, mlp.down_proj)
                       if isinstance(m, Q4_1Linear)]
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if len(linears) != 4:
                return None
            tensors = [n.weight for n in norms] + [m.bias for m in linears if m.bias is not None]
            if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
                return None
            if mlp.gate_proj.end - mlp.gate_proj.start != mlp.up_proj.end - mlp.up_proj.start:
                return None
            products.update(linear.kernels.q4_1_address for linear in linears)
            epsilons.update(n.variance_epsilon for n in norms)
            widths.add(mlp.gate_proj.end)
            row = [n.weight.data_ptr() for n in norms]
            for linear in linears:
                bias = linear.bias
                row += [linear.packed.data_ptr(), 0 if bias is None else bias.data_ptr()]
            rows.append(row)
        if len(products) != 1 or len(epsilons) != 1 or len(widths) != 1:
            return None
        return cls(torch.tensor(rows, dtype=torch.int64), products.pop(), widths.pop(),
                   float(epsilons.pop()), layers)

    def __call__(self, kernels: StepKernels, x: torch.Tensor, num_heads: int, kv: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor,
                 step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(x without the last layer's MLP output, that output), as the op-by-op loop of
        `DecoderForward` leaves them."""
        plan = step.plan
        return kernels.decoder_layers(x, self.table, self.intermediate, self.eps, self.product,
                                      kv, cos, sin, step.slots, plan.extents, num_heads,
                                      plan.scale)


def _whole(*slices: nn.Module) -> nn.Module | None:
    """The projection these modules are consecutive slices of, covering all of it; else None."""
    fused = getattr(slices[0], "fused", None)
    if fused is None or any(type(s) is not OutputSlice or s.fused is not fused for s in slices):
        return None
    ends = [0] + [s.end for s in slices]
    if any(s.start != end for s, end in zip(slices, ends)) or ends[-1] != fused.out_features:
        return None
    return fused
