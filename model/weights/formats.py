"""Weight formats: the loaded model's linear layers as loaded, with q / k / v and gate / up
stacked into one matmul each on a GPU; or, on a CPU, in bf16, or in int4 built from a GGUF's own
Q4_1 blocks.

The CPU decode step is bound by reading weights, so smaller weights make it faster. int4 keeps
the Q4_1 blocks (32 weights w = d * q + m, fp16 d and m, 4-bit q) as they are in the file, and
the LM head as the file's Q8_0 blocks. Both are multiplied by the project's own kernel
(`model.weights.gguf_blocks`, `block_matmul.c`), which rounds activations to 8 bits per block as
llama.cpp does, in a variant for the CPU's instruction set; all variants compute the same bits.
The rest of the step (norms, attention, residuals) stays in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from model.weights.gguf_blocks import (
    Q4_1Linear,
    Q8_0Linear,
    pack_q4_1,
    pack_q8_0,
    quantize_q4_1,
    quantize_q8_0,
    unpack_q8_0,
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


def unpermute_rows(raw: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of q / k rows (its rotary layout), as transformers does
    when it loads a GGUF; whole rows move, so quantized blocks stay intact."""
    half = raw.shape[0] // num_heads // 2
    return raw.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(raw.shape)


def int4_blocks_from_gguf(model: nn.Module, gguf_path: str | Path) -> dict[str, torch.Tensor]:
    """The int4 format's weights from the GGUF's own blocks, packed for the kernel: each fused
    linear of the decoder layers from its Q4_1 tensors, the LM head from its Q8_0 tensor (see
    `int4_head_blocks`). Raises WeightFormatError for a GGUF whose linears are not all Q4_1."""
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

    blocks = {_block_name(g.layer, g.gguf_names): pack_q4_1(
        np.concatenate([q4_1_rows(g.layer, name) for name in g.gguf_names]))
        for g in _linear_groups(model)}
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))  # untied, or tied
    q8_0_rows = None
    if head is not None and head.tensor_type.name == "Q8_0":
        q8_0_rows = np.asarray(head.data)
    blocks[HEAD_BLOCKS] = int4_head_blocks(model, q8_0_rows)
    return blocks


def int4_blocks_quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int4 format's weights quantized here to Q4_1, packed for the kernel (for a model that
    comes without a GGUF); the LM head as `int4_head_blocks`."""
    blocks = {_block_name(g.layer, g.gguf_names): pack_q4_1(
        quantize_q4_1(torch.cat([linear.weight for linear in g.linears])))
        for g in _linear_groups(model)}
    blocks[HEAD_BLOCKS] = int4_head_blocks(model, None)
    return blocks


def int4_head_blocks(model: nn.Module, q8_0_rows: np.ndarray | None) -> torch.Tensor:
    """The LM head of the int4 format, packed Q8_0 blocks: the GGUF's own, else quantized here
    (as llama.cpp's quantizer makes them, q in -127..127; the kernels' products need that
    range)."""
    weight = model.get_output_embeddings().weight
    if (q8_0_rows is None or q8_0_rows.shape[0] != weight.shape[0]
            or unpack_q8_0(q8_0_rows)[0].min() < -127):
        q8_0_rows = quantize_q8_0(weight)
    return pack_q8_0(q8_0_rows)


def use_int4_blocks(model: nn.Module, blocks: dict[str, torch.Tensor]) -> None:
    """Every linear of the decoder layers, and the LM head, multiplied by the quantized-block
    kernel from `blocks` (`int4_blocks_from_gguf` or `int4_blocks_quantized`). The LM head,
    tied to the input embeddings, gets its own blocks, and the embeddings stay as they are."""
    _replace_linears(model, lambda index, names, linears: Q4_1Linear(
        blocks[_block_name(index, names)], sum(linear.out_features for linear in linears),
        linears[0].in_features, _joined_bias(linears)))
    head = model.get_output_embeddings()
    out_features, in_features = head.weight.shape
    model.set_output_embeddings(Q8_0Linear(blocks[HEAD_BLOCKS], out_features, in_features,
                                           head.bias))


HEAD_BLOCKS = "output"  # the LM head's name among the int4 blocks


def _block_name(index: int, gguf_names: tuple[str, ...]) -> str:
    """A fused linear's name among the int4 blocks: `blk.3.attn_q+attn_k+attn_v`."""
    return f"blk.{index}.{'+'.join(gguf_names)}"


def has_q4_1_linears(gguf_path: str | Path) -> bool:
    """Whether every linear of the GGUF's decoder layers is Q4_1 (what int4 is built from)."""
    from gguf import GGUFReader

    kinds = [t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors
             if t.name.startswith("blk.") and t.name.endswith(".weight")
             and t.name.split(".")[2] in GGUF_LINEARS]
    return bool(kinds) and all(kind == "Q4_1" for kind in kinds)


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


class LinearGroup(NamedTuple):
    """Linears of one decoder layer computed together, as one module."""

    layer: int  # the layer's index
    parent: nn.Module  # the module holding them
    gguf_names: tuple[str, ...]
    attributes: tuple[str, ...]
    linears: list[nn.Module]


def _linear_groups(model: nn.Module) -> Iterator[LinearGroup]:
    for index, layer in enumerate(model.get_decoder().layers):
        for parent_name, gguf_names, attributes in FUSED_GROUPS:
            parent = layer.get_submodule(parent_name)
            yield LinearGroup(index, parent, gguf_names, attributes,
                              [getattr(parent, a) for a in attributes])


def _replace_linears(model: nn.Module, make) -> None:
    """`make(layer index, GGUF names, linears)` builds one module for the linears' rows
    stacked; several linears become slices of it."""
    for group in list(_linear_groups(model)):
        fused = make(group.layer, group.gguf_names, group.linears)
        if len(group.linears) == 1:
            setattr(group.parent, group.attributes[0], fused)
            continue
        start = 0
        for attribute, linear in zip(group.attributes, group.linears):
            end = start + linear.out_features
            setattr(group.parent, attribute, OutputSlice(fused, start, end))
            start = end


def _joined_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None
                      else linear.weight.new_zeros(linear.out_features) for linear in linears])
