"""The C attention kernel (`attention_kernel.c`): built with the system's C compiler on first use
and cached, loaded through ctypes. It needs no torch headers, so building takes about a second;
without a compiler, attention runs on torch ops instead (and says so once in the log)."""

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_kernel.c")
# -march=native: the library is built on the machine that runs it; the CPU's flags are part of
# its cache key. -ffp-contract=off: the source says where to fuse multiply-adds (fmaf).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared",
         "-fPIC")
POINTER, INT64 = ctypes.c_void_p, ctypes.c_int64


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "groupwise" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def _library_function():
    """The loaded `attend_tokens`, or None where no C compiler can build it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: attention runs on torch ops (slower, and batched "
                    "output may differ from unbatched in the last bits)")
        return None
    key = "\n".join([SOURCE.read_text(), compiler, *FLAGS, platform.machine(), _cpu_flags()])
    target = cache_dir() / f"attention-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            log.warning("building the attention kernel failed, attention runs on torch "
                        "ops:\n%s", built.stderr[-2000:])
            return None
        os.replace(partial, target)  # atomic: a concurrent builder never loads half a file
    function = ctypes.CDLL(str(target)).attend_tokens
    function.argtypes = [POINTER] * 7 + [INT64] * 5 + [ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def available() -> bool:
    return _library_function() is not None


def attend_tokens(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  extent_starts: torch.Tensor, extent_lengths: torch.Tensor,
                  token_extents: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D]; keys / values [Hkv, slots, D] (fp32, CPU). Token t attends the slots of
    extents token_extents[t] .. token_extents[t + 1] - 1, in order (int64 tensors). The caller
    guarantees every extent lies inside the pool and every token has at least one key."""
    function = _library_function()
    if function is None:
        raise RuntimeError("the attention kernel is not available")
    q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_slots, _ = keys.shape
    out = torch.empty_like(q)
    failed = function(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
                      extent_starts.data_ptr(), extent_lengths.data_ptr(),
                      token_extents.data_ptr(), num_tokens, num_heads, num_kv_heads, num_slots,
                      head_dim, scale, torch.get_num_threads())
    if failed:
        raise MemoryError("the attention kernel could not allocate its scratch memory")
    return out
