"""The settings of the process that a bench loading a model in-process takes at its edge, as the
server does: where what is built once is kept (--cache, GROUPWISE_CACHE) and the most the CPU
kernels may use (--cpu-isa, GROUPWISE_CPU_ISA)."""

from __future__ import annotations

import argparse
import os

from model.cache import use_cache_dir
from model.native import ISA_CHOICES, IsaError, check_isa_cap, use_isa_cap


def add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=os.environ.get("GROUPWISE_CACHE"),
                        help="where what is built once is kept: converted models, the CPU "
                        "kernels (default: GROUPWISE_CACHE, else ~/.cache/groupwise)")
    parser.add_argument("--cpu-isa", type=_isa_cap,
                        default=os.environ.get("GROUPWISE_CPU_ISA", "auto"),
                        help="the most the CPU kernels may use: " + ", ".join(ISA_CHOICES)
                        + " (default: GROUPWISE_CPU_ISA, else auto: all this CPU runs)")


def use_build_options(args: argparse.Namespace) -> None:
    use_cache_dir(args.cache)
    use_isa_cap(_isa_cap(args.cpu_isa))  # the default comes unchecked from the environment


def _isa_cap(text: str) -> str:
    try:
        return check_isa_cap(text)
    except IsaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
