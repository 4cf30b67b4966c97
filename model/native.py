"""C sources built into shared libraries on first use and loaded through ctypes: the CPU kernels
of the forward (`model.forward.cpu_kernels`) and of the quantized weights
(`model.weights.block_matmul`). They need no torch headers, so a build takes about a second;
the library is cached under the cache dir, keyed by its source, compiler, flags and CPU."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from model.cache import cache_dir

log = logging.getLogger(__name__)

# -march=native: the library is built on the machine that runs it; the CPU's flags are part of
# its cache key. -ffp-contract=off: the source says where to fuse multiply-adds (fmaf).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared",
         "-fPIC")
POINTER, INT64, FLOAT, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_library(source: Path, signatures: dict[str, tuple[list, object]],
                  without: str) -> ctypes.CDLL | None:
    """`source` built (or found in the cache) and loaded, its functions typed by `signatures`
    (name -> (argument types, return type)); None where no C compiler can build it, after
    logging once what runs instead (`without`)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s", without)
        return None
    key = "\n".join([source.read_text(), compiler, *FLAGS, platform.machine(), _cpu_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial), "-lm"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            log.warning("building %s failed: %s\n%s", source.name, without, built.stderr[-2000:])
            return None
        os.replace(partial, target)  # atomic: a concurrent builder never loads half a file
    library = ctypes.CDLL(str(target))
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library
