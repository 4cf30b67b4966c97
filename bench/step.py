"""Decode step time against batch size, and prefill speed, on the engine (no server, no HTTP).

    python -m bench.step                          # embedded model, default weights: 1, 8, 32 rows
    python -m bench.step --weights fp32 --rows 1,8 --steps 10 --hf

Each row is a different SQuAD passage's question (about 300 prompt tokens), decoding with no
shared prefix beyond the system prompt. A step's time is the mean of --steps engine steps once
every row is decoding. `--hf` also times transformers' eager forward over a DynamicCache for
the same rows (the forward the engine used before its own), for a before / after table.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from transformers import DynamicCache

from bench.squad import load_selection
from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.request import Status
from model.engine.sampling import SamplingParams
from model.prompts import encode_chat, question_messages
from model.weights.formats import WEIGHT_CHOICES
from model.weights.loading import load_model


def prompts(tokenizer, count: int) -> list[list[int]]:
    selection = load_selection(count)
    return [encode_chat(tokenizer, question_messages(c["context"], c["questions"][0]["question"]))
            for c in selection]


def engine_step_ms(engine: GroupedEngine, rows: list[list[int]], steps: int) -> float:
    engine.cache.clear()
    # rows that start early must still be decoding when the last one starts
    params = SamplingParams(max_tokens=steps + len(rows) * 2 + 16, ignore_eos=True)
    members = [Member(prompt, params) for prompt in rows]
    for member in members:
        engine.add([member], uses_trained_head=False)
    while not all(m.status is Status.DECODE for m in members):
        engine.step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - began)
    for member in members:
        member.abort()
    while engine.has_work:
        engine.step()
    return 1000 * statistics.fmean(times)


def prefill_tokens_per_s(engine: GroupedEngine, prompt: list[int]) -> float:
    engine.cache.clear()
    engine.add([Member(prompt, SamplingParams(max_tokens=1))], uses_trained_head=False)
    began = time.perf_counter()
    while engine.has_work:
        engine.step()
    return len(prompt) / (time.perf_counter() - began)


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
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                **cache_kwargs(model, cache))
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    position = positions[:, -1:] + 1
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        began = time.perf_counter()
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=position,
                    **cache_kwargs(model, cache))
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - began)
        position = position + 1
    return 1000 * statistics.fmean(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                        help="auto (the server's default), fp32, bf16 or int4")
    parser.add_argument("--hf", action="store_true", help="also time transformers' forward")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, threads=args.threads, weights=args.weights)
    engine = GroupedEngine(loaded.model, loaded.tokenizer)
    sizes = [int(s) for s in args.rows.split(",")]
    all_prompts = prompts(loaded.tokenizer, max(sizes))
    engine_step_ms(engine, all_prompts[:1], 2)  # warm-up
    results = []
    for size in sizes:
        row = {"rows": size, "engine_ms": engine_step_ms(engine, all_prompts[:size], args.steps)}
        row["engine_tokens_per_s"] = 1000 * size / row["engine_ms"]
        if args.hf:
            row["hf_ms"] = hf_step_ms(loaded.model, all_prompts[:size], args.steps)
            row["hf_tokens_per_s"] = 1000 * size / row["hf_ms"]
        results.append(row)
    prefill = prefill_tokens_per_s(engine, all_prompts[0])
    print(f"model {loaded.name}, {loaded.weights} weights, {torch.get_num_threads()} threads; "
          f"prompts of about {len(all_prompts[0])} tokens")
    header = "| rows | engine step (ms) | engine tokens/s |"
    header += " transformers step (ms) | transformers tokens/s |" if args.hf else ""
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for row in results:
        line = f"| {row['rows']} | {row['engine_ms']:.1f} | {row['engine_tokens_per_s']:.0f} |"
        if args.hf:
            line += f" {row['hf_ms']:.1f} | {row['hf_tokens_per_s']:.0f} |"
        print(line)
    print(f"prefill: {prefill:.0f} tokens/s (one {len(all_prompts[0])}-token prompt)")
    return results


if __name__ == "__main__":
    main()
