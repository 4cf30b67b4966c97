"""Every instruction-set variant of the CPU kernels computes the same bits as the portable C.

`tests/native/kernel_check.c` runs the block matmuls, attention, RMS norm and rotary + store on
fixed pseudo-random inputs and prints a hash of each output. It is built here once per variant:
every x86 variant this CPU runs, natively; the AArch64 ones (NEON with and without the
dot-product extension, and portable C) with Debian's cross compiler, run under qemu-user
(`make test-deps` installs both), or natively on an AArch64 machine. Each must print what the
portable build prints on this machine: one set of answers on every CPU.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from model.native import FLAGS, X86_ISAS, compiler, isa_flags, runnable_isas

DRIVER = Path(__file__).parent / "native" / "kernel_check.c"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"
# AArch64 targets: (name it reports, compiler flags)
ARM_VARIANTS = {
    "neon-dotprod": ("-march=armv8.2-a+dotprod",),
    "neon": ("-march=armv8-a",),
    "scalar": ("-march=armv8-a", "-DGROUPWISE_PORTABLE"),
}
IS_ARM = platform.machine().lower() in ("aarch64", "arm64")
COMPILER = compiler() or "cc"
# the libraries' flags, for an executable
DRIVER_FLAGS = tuple(flag for flag in FLAGS if flag not in ("-shared", "-fPIC"))


def build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    built = subprocess.run([compiler, *DRIVER_FLAGS, *flags, "-Wall", "-Werror", str(DRIVER),
                            "-o", str(target), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr


def run(command: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the variants the build reports, its output lines)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, *lines = done.stdout.splitlines()
    assert first.startswith("variants ")
    return tuple(first.split()[1:]), lines


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> list[str]:
    """What the portable build prints on this machine: what every variant must print."""
    target = tmp_path_factory.mktemp("kernels") / "scalar"
    build(COMPILER, isa_flags("scalar"), target)
    variants, lines = run([str(target)])
    assert variants == ("scalar", "scalar")
    assert len(lines) > 100
    return lines


@pytest.mark.parametrize("isa", [isa for isa in runnable_isas() if isa in X86_ISAS])
def test_each_x86_variant_this_cpu_runs_computes_what_the_portable_one_does(isa, portable,
                                                                         tmp_path):
    """On an AVX-512 machine both x86 variants; on an AVX2 one, AVX2."""
    target = tmp_path / isa
    build(COMPILER, isa_flags(isa), target)
    variants, lines = run([str(target)])
    assert variants == (isa, "avx2")  # the attention's AVX2 loops serve AVX-512 CPUs too
    assert lines == portable


@pytest.mark.skipif(IS_ARM, reason="x86 targets need an x86 compiler")
def test_the_avx512_variant_compiles_on_any_x86_machine(tmp_path):
    """A CPU without AVX-512 cannot run it, but a change that breaks its build fails here."""
    built = subprocess.run([COMPILER, *DRIVER_FLAGS, "-march=icelake-server", "-Wall",
                            "-Werror", "-c", str(DRIVER), "-o", str(tmp_path / "avx512.o")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr


@pytest.mark.parametrize("variant", ARM_VARIANTS)
def test_each_aarch64_variant_computes_what_the_portable_one_does(variant, portable, tmp_path):
    """Cross-compiled and run under qemu on an x86 machine; native on an AArch64 one."""
    cross = COMPILER if IS_ARM else "aarch64-linux-gnu-gcc"
    runner = [] if IS_ARM else ["qemu-aarch64", "-L", ARM_SYSROOT]
    missing = [tool for tool in (cross, *runner[:1]) if shutil.which(tool) is None]
    assert not missing, (f"{', '.join(missing)} missing: `make test-deps` installs "
                         "gcc-aarch64-linux-gnu and qemu-user")
    target = tmp_path / variant
    build(cross, ARM_VARIANTS[variant], target)
    variants, lines = run([*runner, str(target)])
    assert variants == (variant, "scalar" if variant == "scalar" else "neon")
    assert lines == portable
