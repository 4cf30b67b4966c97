"""The C kernels of a decoder step on a CPU: `kernels.c` (attention, norm, rotary) and
`block_matmul.c` (linears in a GGUF's quantized blocks). Built with the system's C compiler on
first use and cached, loaded through ctypes. They need no torch headers, so building takes about
a second; without a compiler, the step runs on torch ops instead (and says so once in the log)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from model.cache import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.c", "block_matmul.c"))
# -march=native: the library is built on the machine that runs it; the CPU's flags are part of
# its cache key. -ffp-contract=off: the source says where to fuse multiply-adds (fmaf).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared",
         "-fPIC")
POINTER, INT64, FLOAT, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # function -> (argument types, return type)
    "attend_spans": ([POINTER] * 8 + [INT64] * 5 + [FLOAT, INT], INT),
    "rms_norm": ([POINTER] * 3 + [INT64] * 2 + [FLOAT, INT], None),
    "rotate_and_store": ([POINTER] * 3 + [INT64] + [POINTER] * 6 + [INT64] * 5 + [INT], None),
    "q4_1_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "q8_0_matmul": ([POINTER, INT64, INT64, POINTER, INT64, POINTER, INT], INT),
    "block_matmul_available": ([], INT),
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built library, or None where no C compiler can build it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the decoder step runs on torch ops (slower, and "
                    "batched output may differ from unbatched in the last bits)")
        return None
    sources = [source.read_text() for source in SOURCES]
    key = "\n".join([*sources, compiler, *FLAGS, platform.machine(), _cpu_flags()])
    target = cache_dir() / "kernels" / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(partial),
                                "-lm"], capture_output=True, text=True)
        if built.returncode != 0:
            log.warning("building the CPU kernels failed, the decoder step runs on torch "
                        "ops:\n%s", built.stderr[-2000:])
            return None
        os.replace(partial, target)  # atomic: a concurrent builder never loads half a file
    library = ctypes.CDLL(str(target))
    for name, (arguments, result) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def available() -> bool:
    return _library() is not None


def block_matmul_available() -> bool:
    """Whether this CPU runs the quantized-block matmuls (they need AVX-512 VNNI)."""
    library = _library()
    return library is not None and library.block_matmul_available() == 1


def usable_for(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernels can run this step: fp32 on a CPU, heads a multiple of 8 wide."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and head_dim % 8 == 0
            and available())


def attend_spans(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 extent_starts: torch.Tensor, extent_lengths: torch.Tensor,
                 span_extents: torch.Tensor, span_tokens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [T, Hq, D]; keys / values [Hkv, slots, D] (fp32, CPU). Span s is tokens
    span_tokens[s] .. span_tokens[s + 1] - 1 of one sequence; its first token attends the slots
    of extents span_extents[s] .. span_extents[s + 1] - 1, in order, and each next token one
    slot more of the last extent (int64 tensors). The caller guarantees every extent lies inside
    the pool and every token has at least one key."""
    q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_slots, _ = keys.shape
    out = torch.empty_like(q)
    failed = _library().attend_spans(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
        extent_starts.data_ptr(), extent_lengths.data_ptr(), span_extents.data_ptr(),
        span_tokens.data_ptr(), span_extents.shape[0] - 1, num_heads, num_kv_heads, num_slots,
        head_dim, scale, torch.get_num_threads())
    if failed:
        raise MemoryError("the attention kernel could not allocate its scratch memory")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm of x [T, d] (fp32, CPU) in one call."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _library().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0],
                        x.shape[1], eps, torch.get_num_threads())
    return out


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     num_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) * D]: each token's query, key and value heads side by side (one
    fused projection's output); cos / sin [T, D]. Writes the rotated keys and the values to
    pool slots `slots` of keys / values [Hkv, slots, D]; returns the rotated queries [T, Hq, D]."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    num_tokens, width = qkv.shape
    num_kv_heads, num_slots, _ = keys.shape
    q_out = qkv.new_empty(num_tokens, num_heads, head_dim)
    at = qkv.data_ptr()
    step = qkv.element_size() * head_dim
    _library().rotate_and_store(
        at, at + step * num_heads, at + step * (num_heads + num_kv_heads), width,
        cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), keys.data_ptr(), values.data_ptr(),
        slots.data_ptr(), num_tokens, num_heads, num_kv_heads, num_slots, head_dim,
        torch.get_num_threads())
    return q_out


def q4_1_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 times Q4_1 weights packed by `model.gguf_blocks.pack_q4_1`: [M, N] fp32."""
    return _block_matmul(_library().q4_1_matmul, x, packed, out_features)


def q8_0_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 times Q8_0 weights packed by `model.gguf_blocks.pack_q8_0`: [M, N] fp32."""
    return _block_matmul(_library().q8_0_matmul, x, packed, out_features)


def _block_matmul(function, x: torch.Tensor, packed: torch.Tensor,
                  out_features: int) -> torch.Tensor:
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if x.shape[0] == 0:
        return y
    failed = function(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), out_features,
                      y.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("the quantized matmul kernel could not allocate its scratch memory")
    return y
