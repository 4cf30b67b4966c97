"""Compiles the Triton kernels for an H100 (sm_90) on a machine without a GPU, with the compiler
and ptxas that ship in Triton's wheel; run by test_triton_compile.py in a process of its own
(Triton's interpreter, on in the test run, must be off before Triton is imported).

    python -m tests.triton_compile        # a line per kernel; exits 1 if any fails to compile

Shapes: Qwen2.5-7B's (7 query heads per kv head, head_dim 128) and the embedded model's (3, 64)
in bf16, the tiny test model's (2, 16) in fp32.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from model.forward import triton_attention as attention
from model.forward import triton_ops as ops

H100 = GPUTarget("cuda", 90, 32)
SHAPES = [("bf16", 7, 128), ("bf16", 3, 64), ("fp32", 2, 16)]
STRIDES = dict.fromkeys(["stride_qt", "stride_qh", "stride_kh", "stride_ks", "stride_vh",
                         "stride_vs"], "i64")
EXTENTS = {"Starts": "*i64", "Lengths": "*i64", "Firsts": "*i64"}


def compile_for_h100(kernel, types: dict[str, str], constants: dict) -> None:
    signature = {**types, **dict.fromkeys(constants, "constexpr")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=H100, options={"num_warps": 4})
    assert compiled.asm["cubin"]


def cases():
    """(name, kernel, argument types, constants) of every kernel at every shape."""
    for dtype, group, head_dim in SHAPES:
        pointer, block_d = f"*{dtype}", triton.next_power_of_2(head_dim)
        common = {"BLOCK_N": attention.BLOCK_N, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
                  "IS_FP32": dtype == "fp32", "GROUP": group}
        shape = f"{dtype}, {group} heads per kv head, head_dim {head_dim}"
        yield (f"decode ({shape})", attention._decode_split_kernel, {
            "Q": pointer, "K": pointer, "V": pointer, "Partial": "*fp32",
            "PartialLse": "*fp32", **EXTENTS, "scale": "fp32", **STRIDES,
        }, {**common, "BLOCK_H": attention._block_h(group, 16),
            "NUM_SPLITS": attention.NUM_SPLITS})
        yield (f"merge ({shape})", attention._merge_splits_kernel, {
            "Partial": "*fp32", "PartialLse": "*fp32", "Out": pointer, "stride_ot": "i64",
            "stride_oh": "i64",
        }, {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "NUM_SPLITS": attention.NUM_SPLITS})
        block_h = attention._block_h(group, 1)
        yield (f"prefill ({shape})", attention._prefill_kernel, {
            "Q": pointer, "K": pointer, "V": pointer, "Out": pointer, **EXTENTS,
            "Tokens": "*i64", "first_span": "i32", "scale": "fp32", **STRIDES,
            "stride_ot": "i64", "stride_oh": "i64",
        }, {**common, "BLOCK_H": block_h, "BLOCK_M": max(1, attention.TOKEN_ROWS // block_h)})
    for dtype in ("bf16", "fp32"):
        pointer = f"*{dtype}"
        for has_delta in (True, False):
            yield (f"add + rms norm ({dtype}, delta {has_delta})", ops._add_rms_norm_kernel, {
                "X": pointer, "Source": pointer, "Residual": pointer, "Normed": pointer,
                "Weight": pointer, "eps": "fp32", "stride_x": "i64", "stride_source": "i64",
            }, {"HAS_DELTA": has_delta, "DIM": 3584, "BLOCK": 4096})
        yield (f"rotate and store ({dtype})", ops._rotate_and_store_kernel, {
            "QKV": pointer, "Cos": pointer, "Sin": pointer, "QOut": pointer, "Keys": pointer,
            "Values": pointer, "Slots": "*i64", "stride_t": "i64", "stride_cos": "i64",
            "stride_sin": "i64", "stride_kh": "i64", "stride_ks": "i64", "stride_vh": "i64",
            "stride_vs": "i64",
        }, {"NUM_HEADS": 28, "NUM_KV_HEADS": 4, "HEAD_DIM": 128, "HALF": 64})
        yield (f"silu and mul ({dtype})", ops._silu_and_mul_kernel, {
            "Gate": pointer, "Up": pointer, "Out": pointer, "stride_gate": "i64",
            "stride_up": "i64",
        }, {"WIDTH": 18944, "BLOCK": 1024})


def main() -> int:
    failed = 0
    for name, kernel, types, constants in cases():
        try:
            compile_for_h100(kernel, types, constants)
            print(f"compiled: {name}")
        except Exception as exc:  # noqa: BLE001 - every kernel is tried, each failure printed
            failed += 1
            print(f"FAILED: {name}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
