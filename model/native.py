"""C sources built into shared libraries on first use and loaded through ctypes: the CPU kernels
of the forward (`model.forward.cpu_kernels`) and of the quantized weights
(`model.weights.block_matmul`). They need no torch headers, so a build takes about a second;
the library is cached under the cache dir, keyed by its source, compiler, flags and CPU.

Each source holds one variant per instruction set, chosen by the compiler's target: AVX-512
(with VNNI), AVX2 (x86-64-v3: AVX2, FMA, F16C), NEON (AArch64, with the dot-product extension
where the CPU has it) and portable scalar C. Every variant computes the same bits. The fastest
one this CPU runs is built, unless a cap (`avx512`, `avx2`, `neon`, `scalar`) limits it: then
the fastest one up to the cap, so one AVX-512 machine runs and tests every x86 variant. The cap
is a setting of the process: the edge (the server's --cpu-isa, the benches' --cpu-isa, the
tests; GROUPWISE_CPU_ISA) sets it once with `use_isa_cap`.
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
ISA_CHOICES = ("auto", *ISAS)  # what a cap may say; auto: no cap
_cap = "auto"
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


def use_isa_cap(cap: str | None) -> None:
    """From now on, for the whole process; None or "": auto. Raises IsaError for a cap this CPU
    cannot take."""
    global _cap
    _cap = check_isa_cap(cap or "auto")


def isa_cap() -> str:
    return _cap


def check_isa_cap(cap: str) -> str:
    """`cap`, lower-cased, if it caps this CPU's kernels; IsaError (naming what this CPU runs)
    for an unknown one or one of another architecture."""
    cap = cap.lower()
    if cap == "auto" or cap in _family():
        return cap
    reason = (f"not an instruction set of this {platform.machine()} CPU" if cap in ISAS
              else f"use one of {', '.join(ISA_CHOICES)}")
    raise IsaError(f"{cap!r}: {reason} (this CPU runs {', '.join(runnable_isas())})")


def chosen_isa(cap: str | None = None) -> str:
    """The fastest instruction set this CPU runs, at most `cap` (default: the process's cap)."""
    cap = check_isa_cap(cap or _cap)
    runnable = runnable_isas()
    if cap == "auto":
        return runnable[0]
    family = _family()
    allowed = family[family.index(cap):]
    return next(isa for isa in runnable if isa in allowed)


def _family() -> tuple[str, ...]:
    """The instruction sets of this CPU's architecture, fastest first."""
    return ("neon", "scalar") if _is_arm() else ("avx512", "avx2", "scalar")


def describe_isa() -> str:
    """The chosen instruction set, for logs and reports: `avx2 (of avx2, scalar)`, and the cap
    when one is set."""
    capped = f", capped at {_cap}" if _cap != "auto" else ""
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
