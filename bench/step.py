"""Decode step time against batch size, and prefill speed, on the engine (no server, no HTTP),
beside what the machine's memory bandwidth allows.

    python -m bench.step                          # embedded model, default weights: 1, 8, 32 rows
    python -m bench.step --weights fp32 --rows 1,8 --steps 10 --hf
    python -m bench.step --shape qwen2.5-7b --device cuda --rows 1,8,32,64 --profile

Each row is a different SQuAD passage's question (about 300 prompt tokens), decoding with no
shared prefix beyond the system prompt. A step's time is the mean of --steps engine steps once
every row is decoding. Its bound is the time the step's reads take at the memory bandwidth
measured here (a large copy): every weight once, and each row's keys and values. `--shape`
builds random weights of a known architecture (the tokenizer is the embedded model's, or
--tokenizer's), so a GPU is measured without downloading a model. `--hf` also times
transformers' eager forward over a DynamicCache for the same rows; `--profile` counts the
kernels of a decode step and how much of it the GPU is busy (CUDA only).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
from transformers import DynamicCache

from bench.build_options import add_build_options, use_build_options
from bench.squad import load_selection
from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.request import Status
from model.engine.sampling import SamplingParams
from model.native import cpu_name
from model.weights.choices import WEIGHT_CHOICES
from model.weights.loading import (
    LoadedModel,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from model.weights.shapes import SHAPES, build_random_model
from server.prompts import encode_chat, question_messages


def prompts(tokenizer, count: int) -> list[list[int]]:
    selection = load_selection(count)
    return [encode_chat(tokenizer, question_messages(c["context"], c["questions"][0]["question"]))
            for c in selection]


def long_prompt(tokenizer, num_tokens: int) -> list[int]:
    """`num_tokens` tokens of SQuAD prompts laid end to end."""
    ids: list[int] = []
    count = 16
    while len(ids) < num_tokens:
        ids = [t for p in prompts(tokenizer, count) for t in p]
        count *= 2
    return ids[:num_tokens]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoding(engine: GroupedEngine, rows: list[list[int]], steps: int) -> list[Member]:
    """Members for `rows`, all decoding (with room for `steps` more steps)."""
    engine.cache.clear()
    # rows that start early must still be decoding when the last one starts; a speculating row
    # may write a whole proposal and one token more a step, as far as the pool holds every row
    options = engine.scheduler.speculation.options
    per_step = 1 + options.max_tokens if options.enabled else 1
    room = engine.limits.kv_capacity // len(rows) - max(map(len, rows))
    params = SamplingParams(max_tokens=min((steps + len(rows) * 2 + 16) * per_step, room),
                            ignore_eos=True)
    members = [Member(prompt, params) for prompt in rows]
    for member in members:
        engine.add([member], uses_trained_head=False)
    while not all(m.status is Status.DECODE for m in members):
        engine.step()
    return members


def finish(engine: GroupedEngine, members: list[Member]) -> None:
    for member in members:
        member.abort()
    while engine.has_work:
        engine.step()


def engine_steps(engine: GroupedEngine, rows: list[list[int]],
                 steps: int) -> tuple[float, float]:
    """(mean step ms, tokens a row wrote per step) over `steps` steps of `rows` decoding."""
    members = decoding(engine, rows, steps)
    counted = engine.counters()
    times = []
    for _ in range(steps):
        synchronize(engine.device)
        began = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        times.append(time.perf_counter() - began)
    counters = engine.counters()
    finish(engine, members)
    return 1000 * statistics.fmean(times), counters.tokens_per_row_step_since(counted)


def prefill_tokens_per_s(engine: GroupedEngine, prompt: list[int]) -> float:
    engine.cache.clear()
    engine.add([Member(prompt, SamplingParams(max_tokens=1))], uses_trained_head=False)
    synchronize(engine.device)
    began = time.perf_counter()
    while engine.has_work:
        engine.step()
    synchronize(engine.device)
    return len(prompt) / (time.perf_counter() - began)


def profile_step(engine: GroupedEngine, rows: list[list[int]], steps: int = 5) -> dict:
    """Kernels per decode step, launches from the host per step, and the share of the step's
    wall time the GPU is busy (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    members = decoding(engine, rows, steps + 3)
    for _ in range(3):
        engine.step()
    synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        began = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
        wall = (time.perf_counter() - began) / steps
    finish(engine, members)
    events = profiler.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                "cudaLaunchKernelExC", "cudaGraphLaunch")]
    busy = sum(e.device_time for e in kernels) / 1e6 / steps
    return {"rows": len(rows), "wall_ms": 1000 * wall, "gpu_busy_ms": 1000 * busy,
            "gpu_busy_share": busy / wall, "kernels_per_step": len(kernels) / steps,
            "launches_per_step": len(launches) / steps}


def cache_kwargs(model, cache: DynamicCache) -> dict:
    """The forward's cache arguments. transformers 5 renamed `past_key_values` to `cache` (the old
    name still works but logs a deprecation warning); older releases know only the old name."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


@torch.inference_mode()
def hf_step_ms(model, rows: list[list[int]], steps: int) -> float:
    """transformers' eager forward, left-padded rows over a DynamicCache, one token a step."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                **cache_kwargs(model, cache))
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    position = positions[:, -1:] + 1
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        synchronize(model.device)
        began = time.perf_counter()
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=position,
                    **cache_kwargs(model, cache))
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(model.device)
        times.append(time.perf_counter() - began)
        position = position + 1
    return 1000 * statistics.fmean(times)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second a large copy moves here (each byte read once and written once)."""
    size = 2**30 if device.type == "cuda" else 2**28
    source = torch.ones(size // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    synchronize(device)
    return 2 * 5 * size / (time.perf_counter() - began)


def weight_bytes(model) -> int:
    """What a decode step reads of the weights: every one once, but of the input embeddings
    only their rows (unless they are the LM head too)."""
    head = model.get_output_embeddings()
    head_storages = {t.untyped_storage().data_ptr() for t in head.parameters()}
    head_storages |= {t.untyped_storage().data_ptr() for t in head.buffers()}
    embeddings = model.get_input_embeddings().weight
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        is_lookup = storage.data_ptr() == embeddings.untyped_storage().data_ptr()
        if not is_lookup or storage.data_ptr() in head_storages:
            total += storage.nbytes()
    return total


def bound_ms(engine: GroupedEngine, weights: int, rows: list[list[int]], steps: int,
             bandwidth: float) -> float:
    """The step's reads at `bandwidth`: the weights, and each row's keys and values (its
    context at the middle of the timed steps)."""
    per_token = engine.forward.pool_shape.bytes_per_token(engine.model.dtype)
    context = sum(len(r) for r in rows) + len(rows) * (len(rows) * 2 + steps // 2)
    return 1000 * (weights + context * per_token) / bandwidth


def load(args: argparse.Namespace) -> LoadedModel:
    if args.shape:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        return build_random_model(args.shape, load_tokenizer(args.tokenizer), device, dtype)
    return load_model(args.model, args.device, args.dtype, threads=args.threads,
                      weights=args.weights)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="embedded (default), tiny-random, a .gguf path, a HF id or a local "
                             "directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="random weights of this architecture instead of --model")
    parser.add_argument("--tokenizer", default=None,
                        help="with --shape: a directory of tokenizer files (default: the "
                             "embedded model's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (float32 on a CPU, bfloat16 on a GPU), float32, bfloat16")
    parser.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                        help="auto (the server's default), loaded, bf16 or int4")
    parser.add_argument("--rows", default="1,8,32",
                        help="comma-separated batch sizes to time, each row a different "
                             "passage's question (default 1,8,32)")
    parser.add_argument("--steps", type=int, default=20,
                        help="decode steps averaged per batch size, once every row decodes "
                             "(default 20)")
    parser.add_argument("--prefill-tokens", type=int, default=0,
                        help="also time the prefill of one prompt this long")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--speculate", action="store_true",
                        help="rows verify proposed tokens, as the server's --speculate auto "
                             "(the rows run past their answers: see bench.engine_bench for "
                             "answers)")
    parser.add_argument("--hf", action="store_true", help="also time transformers' forward")
    parser.add_argument("--profile", action="store_true",
                        help="kernels per step and the GPU's busy share (CUDA)")
    parser.add_argument("--json", default=None, help="write the results here")
    add_build_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_build_options(args)
    loaded = load(args)
    engine = GroupedEngine(loaded.model, loaded.tokenizer, speculate=args.speculate)
    sizes = [int(s) for s in args.rows.split(",")]
    all_prompts = prompts(loaded.tokenizer, max(sizes))
    engine_steps(engine, all_prompts[:1], 2)  # warm-up
    bandwidth, weights = memory_bandwidth(engine.device), weight_bytes(loaded.model)
    report = {"model": loaded.name, "weights": loaded.weights, "device": str(engine.device),
              "device_name": (torch.cuda.get_device_name(engine.device)
                              if engine.device.type == "cuda" else cpu_name()),
              "kernels": loaded.kernels, "speculate": args.speculate,
              "dtype": str(loaded.model.dtype).removeprefix("torch."),
              "weight_bytes": weights, "bandwidth_bytes_per_s": bandwidth,
              "prompt_tokens": len(all_prompts[0]), "rows": []}
    for size in sizes:
        rows = all_prompts[:size]
        step_ms, per_row_step = engine_steps(engine, rows, args.steps)
        row = {"rows": size, "engine_ms": step_ms, "tokens_per_row_step": per_row_step,
               "engine_tokens_per_s": 1000 * size * per_row_step / step_ms,
               "bound_ms": bound_ms(engine, weights, rows, args.steps, bandwidth)}
        if args.hf:
            row["hf_ms"] = hf_step_ms(loaded.model, rows, args.steps)
        report["rows"].append(row)
    report["prefill_tokens_per_s"] = prefill_tokens_per_s(engine, all_prompts[0])
    if args.prefill_tokens:
        report["long_prefill"] = {
            "tokens": args.prefill_tokens, "chunk": engine.max_prefill_tokens,
            "tokens_per_s": prefill_tokens_per_s(
                engine, long_prompt(loaded.tokenizer, args.prefill_tokens))}
    if args.profile and engine.device.type == "cuda":
        report["profile"] = [profile_step(engine, all_prompts[:size]) for size in sizes]
    print_report(report, args.hf, torch.get_num_threads())
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return report


def print_report(report: dict, hf: bool, threads: int) -> None:
    where = (report["device_name"] if report["device"] != "cpu"
             else f"{report['device_name']}, {threads} threads")
    speculation = "speculation on" if report["speculate"] else "speculation off"
    print(f"model {report['model']}, {report['weights']} weights ({report['dtype']}, "
          f"{report['weight_bytes'] / 1e9:.2f} GB read a step), {report['kernels']}, "
          f"{speculation}, {where}; "
          "memory bandwidth "
          f"{report['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (a large copy); prompts of about "
          f"{report['prompt_tokens']} tokens")
    header = ("| rows | engine step (ms) | tokens / row-step | engine tokens/s | bound (ms) |"
              " bound / step |")
    header += " transformers step (ms) |" if hf else ""
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for row in report["rows"]:
        line = (f"| {row['rows']} | {row['engine_ms']:.1f} | {row['tokens_per_row_step']:.2f} |"
                f" {row['engine_tokens_per_s']:.0f} | {row['bound_ms']:.1f} |"
                f" {row['bound_ms'] / row['engine_ms']:.0%} |")
        print(line + (f" {row['hf_ms']:.1f} |" if hf else ""))
    print(f"prefill: {report['prefill_tokens_per_s']:.0f} tokens/s (one "
          f"{report['prompt_tokens']}-token prompt)")
    if "long_prefill" in report:
        long = report["long_prefill"]
        print(f"prefill: {long['tokens_per_s']:.0f} tokens/s (one {long['tokens']}-token prompt "
              f"in chunks of {long['chunk']})")
    for profile in report.get("profile", []):
        print(f"profile, {profile['rows']} rows: {profile['wall_ms']:.1f} ms a step, GPU busy "
              f"{profile['gpu_busy_share']:.0%}, {profile['kernels_per_step']:.0f} kernels and "
              f"{profile['launches_per_step']:.0f} launches a step")


if __name__ == "__main__":
    main()
