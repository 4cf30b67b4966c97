"""Weight formats: the loaded model's linear layers as loaded, with q / k / v and gate / up
stacked into one matmul each on a GPU; or, on a CPU, in bf16, or in int4 built from a GGUF's own
Q4_1 blocks.

The CPU decode step is bound by reading weights, so smaller weights make it faster. int4 keeps
the Q4_1 blocks (32 weights w = d * q + m, fp16 d and m, 4-bit q) as they are in the file, and
the LM head as the file's Q8_0 blocks. On a CPU with AVX-512 VNNI both are multiplied by the
project's own kernel (`model.weights.gguf_blocks`), which rounds activations to 8 bits per block as
llama.cpp does. Elsewhere, torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`) takes
the linears, and the LM head is bf16: torch's kernel stores 4-bit values in groups of 32 with a
bf16 scale and zero per group, dequantizing as (q - 8) * scale + zero, which is the Q4_1 block
with scale = d and zero = m + 8d (only d and m are rounded to bf16); its fast paths take bf16
activations, so the activations are cast around each matmul. The rest of the step (norms,
attention, residuals) stays in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.weights import block_matmul
from model.weights.gguf_blocks import (
    GROUP_SIZE,
    Q4_1Linear,
    Q8_0Linear,
    quantize_q4_1,
    quantize_q8_0,
    unpack_q4_1,
)

# GGUF tensor names of a Llama block's linears -> the module path in a transformers layer
GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class WeightFormatError(ValueError):
    """The requested weight format cannot be built for this model."""


class Bf16Linear(nn.Module):
    """y = x W^T (+ b) with W in bf16; x and y keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = bias
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4PackLinear(nn.Module):
    """y = x W^T (+ b) with W as int4 groups of 32 (torch's CPU int4pack layout)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                 out_features: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/32, N, 2] bf16
        self.out_features, self.in_features = out_features, in_features
        self.bias = bias

    @classmethod
    def from_q4_1(cls, raw: np.ndarray, bias: torch.Tensor | None = None) -> Int4PackLinear:
        """raw: [N, K/32 * 20] bytes of a GGUF Q4_1 tensor, one output row per line."""
        q, d, m = unpack_q4_1(raw)
        out_features, in_features = q.shape
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1)
        return cls(packed, scales_and_zeros.to(torch.bfloat16).contiguous(), out_features,
                   in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE,
                                                       self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weights this layer multiplies by, [N, K] in fp32 (for tests and checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP_SIZE, self.scales_and_zeros).float().T


def int4_linear(raw: np.ndarray, bias: torch.Tensor | None = None) -> nn.Module:
    """The fastest int4 linear this CPU runs for Q4_1 rows: the project's kernel, or torch's."""
    if block_matmul.available():
        return Q4_1Linear(raw, bias)
    return Int4PackLinear.from_q4_1(raw, bias)


def int4_kernel() -> str:
    """Which kernel multiplies int4 weights here: their activations' precision differs, so
    anything computed with int4 weights (training features) names it."""
    return "q4_1-q8" if block_matmul.available() else "int4pack-bf16"


def unpermute_rows(raw: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of q / k rows (its rotary layout), as transformers does
    when it loads a GGUF; whole rows move, so quantized blocks stay intact."""
    half = raw.shape[0] // num_heads // 2
    return raw.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(raw.shape)


def use_int4_from_gguf(model: nn.Module, gguf_path: str | Path) -> None:
    """Every linear of the decoder layers in int4, from the GGUF's own Q4_1 tensors, and the
    LM head from its Q8_0 tensor (see `use_int4_head`). Raises WeightFormatError for a GGUF
    whose linears are not all Q4_1."""
    from gguf import GGUFReader

    config = model.config
    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def q4_1_rows(index: int, gguf_name: str) -> np.ndarray:
        tensor = tensors.get(f"blk.{index}.{gguf_name}.weight")
        if tensor is None or tensor.tensor_type.name != "Q4_1":
            kind = "missing" if tensor is None else tensor.tensor_type.name
            raise WeightFormatError(f"int4 weights need Q4_1 linears; blk.{index}.{gguf_name}"
                                    f" is {kind} in {gguf_path}")
        raw = np.asarray(tensor.data)
        return unpermute_rows(raw, heads[gguf_name]) if gguf_name in heads else raw

    _replace_linears(model, lambda index, names, linears: int4_linear(
        np.concatenate([q4_1_rows(index, name) for name in names]), _joined_bias(linears)))
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))  # untied, or tied
    q8_0 = head is not None and head.tensor_type.name == "Q8_0"
    use_int4_head(model, np.asarray(head.data) if q8_0 else None)


def has_q4_1_linears(gguf_path: str | Path) -> bool:
    """Whether every linear of the GGUF's decoder layers is Q4_1 (what int4 is built from)."""
    from gguf import GGUFReader

    kinds = [t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors
             if t.name.startswith("blk.") and t.name.endswith(".weight")
             and t.name.split(".")[2] in GGUF_LINEARS]
    return bool(kinds) and all(kind == "Q4_1" for kind in kinds)


def use_int4_quantized(model: nn.Module) -> None:
    """Every linear of the decoder layers quantized to Q4_1 here, then int4 (for a model that
    comes without a GGUF); the LM head as `use_int4_head`."""
    _replace_linears(model, lambda index, names, linears: int4_linear(
        quantize_q4_1(torch.cat([linear.weight for linear in linears])),
        _joined_bias(linears)))
    use_int4_head(model, None)


def use_int4_head(model: nn.Module, q8_0_rows: np.ndarray | None) -> None:
    """The LM head of the int4 format: Q8_0 blocks on the quantized-block kernel (the GGUF's
    own, else quantized here), or bf16 where the kernel does not run. Tied to the input
    embeddings, it gets its own copy, and the embeddings stay as they are."""
    if not block_matmul.available():
        use_bf16_head(model)
        return
    head = model.get_output_embeddings()
    if q8_0_rows is None or q8_0_rows.shape[0] != head.weight.shape[0]:
        q8_0_rows = quantize_q8_0(head.weight)
    model.set_output_embeddings(Q8_0Linear(q8_0_rows, head.bias))


def use_stacked_linears(model: nn.Module) -> None:
    """The weights as loaded, with q / k / v and gate / up stacked into one linear each: on a
    GPU one matmul reads them instead of three and two (and one kernel launch serves)."""
    _replace_linears(model, lambda index, names, linears: linears[0] if len(linears) == 1
                     else _stacked_linear(linears))


def _stacked_linear(linears: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([linear.weight for linear in linears])
    bias = _joined_bias(linears)
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    return stacked


def use_bf16_linears(model: nn.Module) -> None:
    """Every linear of the decoder layers, and the LM head, in bf16."""
    _replace_linears(model, lambda index, names, linears: Bf16Linear(
        torch.cat([linear.weight for linear in linears]), _joined_bias(linears)))
    use_bf16_head(model)


def use_bf16_head(model: nn.Module) -> None:
    """The LM head in bf16: tied to the input embeddings, it gets its own bf16 copy, and the
    embeddings stay as they are."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(Bf16Linear(head.weight, head.bias))


class OutputSlice(nn.Module):
    """Columns [start, end) of a fused projection's output: q, k and v (and gate and up) share
    one matmul, one read of the activations and one kernel call. Called alone (as
    transformers' own forward calls it), a slice of stacked plain weights multiplies by its own
    rows of them; of another format it computes the whole projection and keeps its part."""

    def __init__(self, fused: nn.Module, start: int, end: int):
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.fused) is nn.Linear:
            bias = self.fused.bias
            return nn.functional.linear(x, self.fused.weight[self.start : self.end],
                                        None if bias is None else bias[self.start : self.end])
        return self.fused(x)[..., self.start : self.end]


def joined_projection(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the modules' outputs side by side [..., sum of widths]: one fused projection's
    output as it is, separate modules' outputs concatenated."""
    fused = _fused(modules)
    if fused is not None and modules[0].start == 0 and modules[-1].end == fused.out_features:
        return fused
    return lambda x: torch.cat([module(x) for module in modules], dim=-1)


def split_projection(modules: list[nn.Module]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """x -> each module's output; slices of one fused projection with a single call."""
    fused = _fused(modules)
    if fused is None:
        return lambda x: [module(x) for module in modules]
    bounds = [(m.start, m.end) for m in modules]
    return lambda x: [out[..., start:end] for out in [fused(x)] for start, end in bounds]


def _fused(modules: list[nn.Module]) -> nn.Module | None:
    """The projection the modules are all slices of, if they are."""
    fused = getattr(modules[0], "fused", None)
    same = fused is not None and all(getattr(m, "fused", None) is fused for m in modules)
    return fused if same else None


# linears computed together: (module holding them, GGUF names, attribute names)
FUSED_GROUPS = (
    ("self_attn", ("attn_q", "attn_k", "attn_v"), ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("attn_output",), ("o_proj",)),
    ("mlp", ("ffn_gate", "ffn_up"), ("gate_proj", "up_proj")),
    ("mlp", ("ffn_down",), ("down_proj",)),
)


def _replace_linears(model: nn.Module, make) -> None:
    """`make(layer index, GGUF names, linears)` builds one module for the linears' rows
    stacked; several linears become slices of it."""
    for index, layer in enumerate(model.get_decoder().layers):
        for parent_name, gguf_names, attributes in FUSED_GROUPS:
            parent = layer.get_submodule(parent_name)
            linears = [getattr(parent, a) for a in attributes]
            fused = make(index, gguf_names, linears)
            if len(linears) == 1:
                setattr(parent, attributes[0], fused)
                continue
            start = 0
            for attribute, linear in zip(attributes, linears):
                end = start + linear.out_features
                setattr(parent, attribute, OutputSlice(fused, start, end))
                start = end


def _joined_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None
                      else linear.weight.new_zeros(linear.out_features) for linear in linears])
