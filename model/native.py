"""C sources built into shared libraries on first use and loaded through ctypes: the CPU kernels
of the forward (`model.forward.cpu_kernels`) and of the quantized weights
(`model.weights.block_matmul`). They need no torch headers, so a build takes about a second;
the library is cached under the cache dir, keyed by its source, compiler, flags and CPU.

Each source holds one variant per instruction set, chosen by the compiler's target: AVX-512
(with VNNI), AVX2 (x86-64-v3: AVX2, FMA, F16C), NEON (AArch64, with the dot-product extension
where the CPU has it) and portable scalar C. Every variant computes the same bits. The fastest
one this CPU runs is built, unless GROUPWISE_CPU_ISA caps it (`avx512`, `avx2`, `neon`,
`scalar`): then the fastest one up to the cap, so one AVX-512 machine runs and tests every x86
variant. Like CC, the cap is build configuration, read where the compiler runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model.cache import cache_dir

log = logging.getLogger(__name__)

# -ffp-contract=off: the sources say where to fuse multiply-adds (fmaf, the FMA intrinsics).
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
# instruction set -> what it needs of the CPU (/proc/cpuinfo flags) and the compiler's target
X86_ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512_vnni"}, ("-march=native",)),
    "avx2": ({"avx2", "fma", "f16c"}, ("-march=x86-64-v3", "-mtune=native")),
}
NEON_FLAGS = ("-mcpu=native",)
SCALAR_FLAGS = ("-DGROUPWISE_PORTABLE",)  # no target flags: portable C for any CPU
ISAS = ("avx512", "avx2", "neon", "scalar")
CAP_VARIABLE = "GROUPWISE_CPU_ISA"
POINTER, INT64, FLOAT, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class IsaError(ValueError):
    """GROUPWISE_CPU_ISA names an instruction set this CPU cannot be capped to."""


def _cpu_flags() -> str:
    """The CPU's feature line (x86 `flags`, AArch64 `Features`), '' where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo
                         if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.cache
def runnable_isas() -> tuple[str, ...]:
    """The instruction sets whose kernels this CPU runs, fastest first; `scalar` is last."""
    if _is_arm():
        return ("neon", "scalar")
    features = set(_cpu_flags().split())
    return (*(isa for isa, (needs, _) in X86_ISAS.items() if needs <= features), "scalar")


def chosen_isa(cap: str | None = None) -> str:
    """The fastest instruction set this CPU runs, at most `cap` (default: GROUPWISE_CPU_ISA,
    else `auto`). Raises IsaError for an unknown cap, or one of another architecture."""
    cap = (cap or os.environ.get(CAP_VARIABLE) or "auto").lower()
    runnable = runnable_isas()
    if cap == "auto":
        return runnable[0]
    family = ("neon", "scalar") if _is_arm() else ("avx512", "avx2", "scalar")
    if cap not in family:
        known = cap in ISAS
        raise IsaError(f"{CAP_VARIABLE}={cap}: " + (
            f"not an instruction set of this {platform.machine()} CPU" if known
            else f"use auto, {', '.join(ISAS)}") + f" (this CPU runs {', '.join(runnable)})")
    allowed = family[family.index(cap):]
    return next(isa for isa in runnable if isa in allowed)


def describe_isa() -> str:
    """The chosen instruction set, for logs and reports: `avx2 (of avx2, scalar)`, and the cap
    when one is set."""
    cap = os.environ.get(CAP_VARIABLE)
    capped = f", {CAP_VARIABLE}={cap}" if cap and cap.lower() != "auto" else ""
    return f"{chosen_isa()} (of {', '.join(runnable_isas())}{capped})"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags that build the variant of `isa`."""
    if isa == "scalar":
        return SCALAR_FLAGS
    if isa == "neon":
        return NEON_FLAGS
    return X86_ISAS[isa][1]


def compiler() -> str | None:
    """The C compiler: CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source: Path, signatures: Mapping[str, tuple[Sequence[Any], Any]], without: str,
                  isa: str) -> ctypes.CDLL | None:
    """`source` (with the headers beside it) built for `isa` (or found in the cache) and loaded,
    its functions typed by `signatures` (name -> (argument types, return type)); None where no C
    compiler can build it, after logging once what runs instead (`without`)."""
    compiler_path = compiler()
    if compiler_path is None:
        log.warning("no C compiler found: %s", without)
        return None
    flags = (*FLAGS, *isa_flags(isa))
    headers = sorted(source.parent.glob(f"{source.stem}*.h"))
    texts = [path.read_text() for path in (source, *headers)]
    key = "\n".join([*texts, compiler_path, *flags, platform.machine(), _cpu_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{isa}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler_path, *flags, str(source), "-o", str(partial), "-lm"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            log.warning("building %s for %s failed: %s\n%s", source.name, isa, without,
                        built.stderr[-2000:])
            return None
        os.replace(partial, target)  # atomic: a concurrent builder never loads half a file
    library = ctypes.CDLL(str(target))
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library
