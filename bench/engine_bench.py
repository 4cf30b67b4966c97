"""The SQuAD grouping experiment in-process, on the engine (no server, no HTTP).

    python -m bench.engine_bench --contexts 8 --group-sizes 1,5 --csa off
    python -m bench.engine_bench --contexts 20 --group-sizes 1,5 --json out/engine.json

Groups never mix contexts (a context's 5 questions at G=2 are groups of 2, 2, 1). Each group
runs as its own engine batch unless --batch-groups packs several. Each group size starts from
an empty prefix cache; with the cache on, a passage's later groups reuse what its first group
computed; `--prefix-cache off` empties it after every batch, so only grouping saves. Seconds
are generation time only (model loading excluded), measured around the engine calls. Each row
also gives the share of its answers identical to the first group size's, and the report lists
the questions whose answers differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.build_options import add_build_options, use_build_options
from bench.squad import Group, load_selection, make_groups, score_answer
from model.engine.grouped_engine import GroupedEngine
from model.engine.interface import Member, SamplingParams
from model.head.files import shipped_checkpoint
from model.head.group_head import GroupHead, GroupHeadConfig
from model.weights.choices import WEIGHT_CHOICES
from model.weights.loading import LoadedModel, load_model, weights_signature
from server.prompts import encode_chat, question_messages

COLUMNS = [
    ("G", "group_size", "{}"),
    ("groups", "num_groups", "{}"),
    ("questions", "num_questions", "{}"),
    ("billed", "prompt_tokens_billed", "{:,}"),
    ("computed", "prompt_tokens_computed", "{:,}"),
    ("computed %", "computed_share", "{:.1%}"),
    ("generated", "completion_tokens", "{:,}"),
    ("seconds", "seconds", "{:.1f}"),
    ("q/s", "questions_per_second", "{:.2f}"),
    ("tokens / row-step", "tokens_per_row_step", "{:.2f}"),
    ("EM", "em", "{:.3f}"),
    ("F1", "f1", "{:.3f}"),
    ("lenient", "lenient", "{:.3f}"),
    ("tags", "tag_rate", "{:.3f}"),
    ("same as first G", "same_as_first", "{:.1%}"),
]


def build_csa(choice: str | None, loaded: LoadedModel) -> tuple[GroupHead | None, str]:
    """`off`, `untrained` (identity), a checkpoint dir, or None for the shipped default."""
    hidden_size = loaded.model.config.hidden_size
    if choice == "off":
        return None, "off"
    if choice == "untrained":
        return GroupHead(GroupHeadConfig(hidden_size=hidden_size)).eval(), "untrained"
    path = Path(choice) if choice else shipped_checkpoint(loaded.name)
    if path is None:
        return None, "off (no shipped checkpoint)"
    csa = GroupHead.load(
        path, loaded.name, weights_signature(loaded.model), hidden_size
    )
    return csa, str(path)


def run_group_size(
    engine: GroupedEngine, groups: list[Group], params: SamplingParams, batch_groups: int,
    keep_cache: bool = True,
) -> dict:
    """Generates answers for every group, starting from an empty prefix cache; returns the
    result row for this group size. Without `keep_cache` the cache is emptied after every
    batch, so only grouping saves compute (the research setting)."""
    engine.cache.clear()
    texts, usages, seconds = {}, [], 0.0
    counted = engine.counters()
    for start in range(0, len(groups), batch_groups):
        batch = [
            [
                Member(encode_chat(engine.tokenizer, question_messages(q.context, q.question)),
                       params, tag=q.id)
                for q in group.questions
            ]
            for group in groups[start : start + batch_groups]
        ]
        began = time.perf_counter()
        for event in engine.generate(batch):
            texts[event.member.tag] = texts.get(event.member.tag, "") + event.text
            if event.usage is not None:
                usages.append(event.usage)
        seconds += time.perf_counter() - began
        if not keep_cache:
            engine.cache.clear()
        print(f"\r  G={len(groups[0].questions)}: {min(start + batch_groups, len(groups))}"
              f"/{len(groups)} groups", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    counters = engine.counters()
    questions = [q for group in groups for q in group.questions]
    scores = [score_answer(texts[q.id], q.answers) for q in questions]
    billed = sum(u.prompt_tokens for u in usages)
    computed = sum(u.computed_prompt_tokens for u in usages)
    return {
        "group_size": max(len(g.questions) for g in groups),
        "num_groups": len(groups),
        "num_questions": len(questions),
        "prompt_tokens_billed": billed,
        "prompt_tokens_computed": computed,
        "computed_share": computed / billed,
        "completion_tokens": sum(u.completion_tokens for u in usages),
        "seconds": seconds,
        "questions_per_second": len(questions) / seconds,
        "tokens_per_row_step": counters.tokens_per_row_step_since(counted),
        **{key: sum(s[key] for s in scores) / len(scores) for key in ("em", "f1", "lenient")},
        "tag_rate": sum(s["has_tags"] for s in scores) / len(scores),
        "answers": {q.id: texts[q.id] for q in questions},
    }


def compare_with_first(results: list[dict]) -> None:
    """Adds to each row the share of its answers equal to the first group size's answers, and
    the ids of those that differ: grouping should change what a question costs, not what it
    answers (exactly so with CSA off)."""
    first = results[0]["answers"]
    for result in results:
        differing = sorted(i for i, text in result["answers"].items() if text != first[i])
        result["same_as_first"] = 1 - len(differing) / len(first)
        result["differing_from_first"] = differing


def format_table(results: list[dict]) -> str:
    rows = [[title for title, _, _ in COLUMNS]]
    rows += [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=100,
                        help="SQuAD contexts of 5 questions (default 100)")
    parser.add_argument("--group-sizes", default="1,2,3,4,5",
                        help="comma-separated group sizes G, run in this order (default 1,2,3,4,5)")
    parser.add_argument("--csa", default=None, help="off | untrained | PATH (default: shipped)")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--squad", default=None, help="a full SQuAD v1.1 dev file")
    parser.add_argument("--seed", type=int, default=42,
                        help="selection shuffle seed (default 42)")
    parser.add_argument("--max-tokens", type=int, default=96,
                        help="most generated tokens per answer (default 96)")
    parser.add_argument("--batch-groups", type=int, default=1, help="groups per engine batch")
    parser.add_argument("--prefix-cache", choices=["on", "off"], default="on",
                        help="off: empty the prefix cache after every batch, so only grouping "
                        "shares a passage (each group size starts from an empty cache either way)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu or cuda (as the server's --device)")
    parser.add_argument("--dtype", default="auto",
                        help="auto, float32, bfloat16 or float16 (as the server's --dtype)")
    parser.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                        help="auto (the server's default), loaded, bf16 or int4")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--speculate", choices=["auto", "off"], default="auto",
                        help="prompt-lookup speculation, as the server's --speculate (default "
                             "auto; groups the trained head mixes never speculate)")
    parser.add_argument("--json", default=None, help="write the results here")
    add_build_options(parser)
    args = parser.parse_args(argv)

    use_build_options(args)
    loaded = load_model(args.model, args.device, args.dtype, args.threads, args.weights)
    csa, csa_label = build_csa(args.csa, loaded)
    engine = GroupedEngine(loaded.model, loaded.tokenizer, csa,
                           speculate=args.speculate == "auto")
    selection = load_selection(args.contexts, args.squad, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens)
    results = [
        run_group_size(engine, make_groups(selection, size), params, args.batch_groups,
                       keep_cache=args.prefix_cache == "on")
        for size in (int(s) for s in args.group_sizes.split(","))
    ]
    compare_with_first(results)
    report = {"model": loaded.name, "weights": loaded.weights, "csa": csa_label,
              "contexts": args.contexts, "batch_groups": args.batch_groups,
              "prefix_cache": args.prefix_cache, "speculate": args.speculate,
              "kernels": loaded.kernels, "results": results}
    print(f"model {loaded.name}, {loaded.weights} weights ({loaded.kernels}), CSA {csa_label}, "
          f"speculation {args.speculate}, {args.contexts} contexts")
    print(format_table(results))
    for result in results[1:]:
        if result["differing_from_first"]:
            print(f"G={result['group_size']} answers that differ from the first group size's: "
                  + ", ".join(result["differing_from_first"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
