"""Train the group head (CSA + gate and an LM-head adapter) on SQuAD v1.1 train, base model frozen.

    python -m train                  # default recipe: embedded model, shipped checkpoints
    python -m train --bench-contexts 0 --eval-contexts 0   # train only, no evaluation
    python -m train --model tiny-random --out /tmp/csa --max-steps 5 \
        --eval-contexts 0 --bench-contexts 0   # smoke run

Recipe: one (prompt, target) example per question, prompt = the serving prompt, target =
`<answer>{first gold answer}</answer>` + the end-of-turn token. Groups are passages with 1-5
questions. One teacher-forced forward per batch of passages gives every answer step's final
hidden state; those are cached (they do not depend on the trained weights) and training runs on
them in two stages (see `train/stages.py`): the adapter alone, written to `OUT-adapter-only`
as the control, then CSA + gate on top of it, written to `OUT`.
Held-out passages of the train file give the validation loss (the best weights are kept, the
untrained start included) and a generation check; the dev set is never trained on. Weights are
stored in fp16 (`--save-dtype`) and evaluated as stored. Checkpoints hold the base model id and
weights hash, sizes, what is trained, the arguments, history and metrics. Finally the three
controls (base, adapter alone, CSA + adapter) run on the bench selection as
`python -m bench.engine_bench` runs it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.squad import DATA_DIR
from model.cache import use_cache_dir
from model.head.files import CHECKPOINT_DIR, SHIPPED
from model.weights.choices import AUTO_WEIGHTS, WEIGHT_CHOICES
from model.weights.loading import load_model, weights_fingerprint, weights_signature
from train.data import make_examples, read_squad, split_passages
from train.evaluate import bench_controls, heldout_generation
from train.features import cached_features
from train.loop import TrainSettings
from train.stages import stored, train_adapter, train_csa

DEFAULT_TRAIN = DATA_DIR / "train-v1.1-first11.json"
ADAPTER_SUFFIX = "-adapter-only"  # the control's checkpoint sits next to the CSA one
SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--cache", default=os.environ.get("GROUPWISE_CACHE"),
                        help="where what is built once is kept: converted models, the CPU "
                        "kernels, the training features (default: GROUPWISE_CACHE, else "
                        "~/.cache/groupwise)")
    parser.add_argument("--train", default=str(DEFAULT_TRAIN),
                        help="SQuAD v1.1 train JSON (default: the shipped 11-article slice)")
    parser.add_argument("--out", default=None, help="checkpoint dir (default: the shipped one)")
    parser.add_argument("--heldout", type=int, default=60,
                        help="train passages held out for validation (default 60)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out split, the grouping and the initial weights "
                        "(default 0)")
    parser.add_argument("--epochs", type=int, default=2, help="adapter epochs (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="adapter learning rate (default 1e-3)")
    parser.add_argument("--csa-epochs", type=int, default=2,
                        help="CSA + gate epochs, on top of the adapter (default 2)")
    parser.add_argument("--csa-lr", type=float, default=1e-3,
                        help="CSA + gate learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=TrainSettings.weight_decay,
                        help="AdamW weight decay of the weight matrices "
                        f"(default {TrainSettings.weight_decay})")
    parser.add_argument("--batch-tokens", type=int, default=TrainSettings.batch_tokens,
                        help="answer tokens per optimizer step; whole groups are packed "
                        f"(default {TrainSettings.batch_tokens})")
    parser.add_argument("--max-group", type=int, default=TrainSettings.max_group,
                        help="most questions of a passage in one training group, drawn 1 to N "
                        f"(default {TrainSettings.max_group})")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each stage after N steps (default 0: no limit)")
    parser.add_argument("--adapter-rank", type=int, default=32,
                        help="rank of the adapter's logits delta (default 32)")
    parser.add_argument("--head-mlp", type=int, default=1024,
                        help="width of the adapter's residual MLP (default 1024; 0: none)")
    parser.add_argument("--num-heads", type=int, default=8,
                        help="attention heads of the CSA module (default 8)")
    parser.add_argument("--passages-per-batch", type=int, default=4,
                        help="passages per teacher-forced forward computing the features "
                        "(default 4)")
    parser.add_argument("--eval-contexts", type=int, default=20,
                        help="held-out passages answered by generation (default 20; 0 skips)")
    parser.add_argument("--eval-group-sizes", default="5",
                        help="comma-separated group sizes of that generation (default 5)")
    parser.add_argument("--eval-max-tokens", type=int, default=96,
                        help="most generated tokens per answer there (default 96)")
    parser.add_argument("--bench-contexts", type=int, default=20,
                        help="contexts of the bench selection each control runs on "
                        "(default 20; 0 skips the bench)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--weights", default=AUTO_WEIGHTS, choices=WEIGHT_CHOICES,
                        help="the base model's weight format, as the server's --weights "
                        "(the features and the evaluation use it)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the features even when they are cached")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16",
                        help="dtype of the stored weights (float16 halves the checkpoint)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace, model_name: str) -> Path:
    if args.out:
        return Path(args.out)
    if model_name not in SHIPPED:
        raise SystemExit(f"no shipped checkpoint folder for {model_name}: pass --out DIR")
    return CHECKPOINT_DIR / SHIPPED[model_name]


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}\n| control | G | EM | F1 | tags |\n|---|---:|---:|---:|---:|")
    for name, by_size in results.items():
        for size, row in by_size.items():
            print(f"| {name} | {size[1:]} | {100 * row['em']:.1f} | {100 * row['f1']:.1f} "
                  f"| {100 * row.get('tag_rate', 0):.0f}% |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    use_cache_dir(args.cache)
    loaded = load_model(args.model, threads=args.threads, weights=args.weights)
    out = output_dir(args, loaded.name)
    paths = {"adapter-only": Path(f"{out}{ADAPTER_SUFFIX}"), "csa+adapter": out}
    fingerprint = weights_fingerprint(loaded.model)
    passages = read_squad(args.train)
    train_ids, heldout_ids = split_passages(len(passages), args.heldout, args.seed)
    examples = make_examples(loaded.tokenizer, passages)
    features = cached_features(loaded, examples, fingerprint, args.passages_per_batch,
                               use_cache=not args.no_cache)
    train_features, heldout = features.subset(train_ids), features.subset(heldout_ids)
    adapter_settings, csa_settings = (
        TrainSettings(epochs=epochs, lr=lr, weight_decay=args.weight_decay,
                      batch_tokens=args.batch_tokens, max_group=args.max_group,
                      max_steps=args.max_steps, seed=args.seed)
        for epochs, lr in ((args.epochs, args.lr), (args.csa_epochs, args.csa_lr))
    )
    data = {
        "train_file": Path(args.train).name, "train_passages": len(train_ids),
        "train_questions": train_features.num_rows,
        "train_answer_tokens": len(train_features.targets),
        "heldout_passages": len(heldout_ids), "heldout_questions": heldout.num_rows,
    }
    base = {"base_model": loaded.name, "base_signature": weights_signature(loaded.model),
            "meta": {"train_args": {**vars(args), "train": Path(args.train).name}, "data": data}}
    adapter = train_adapter(loaded, train_features, heldout, adapter_settings, args, base)
    csa = train_csa(adapter, loaded, train_features, heldout, csa_settings, args, base)
    heads = {"adapter-only": adapter, "csa+adapter": csa}
    metrics = {"heldout_loss": {
        "base": adapter.meta["history"][0]["heldout_loss"],
        **{name: head.meta["best"]["heldout_loss"] for name, head in heads.items()},
    }}
    # evaluated as stored: the weights in the checkpoint files, not the fp32 masters
    heads = {name: stored(head, paths[name], SAVE_DTYPES[args.save_dtype])
             for name, head in heads.items()}
    if args.eval_contexts:
        sizes = [int(s) for s in args.eval_group_sizes.split(",")]
        metrics["heldout"] = heldout_generation(
            loaded, {"base": None, **heads}, [passages[i] for i in heldout_ids],
            args.eval_contexts, sizes, args.eval_max_tokens,
        )
        print_table("held-out passages (train file), generation", metrics["heldout"])
    if args.bench_contexts:
        metrics["bench"] = bench_controls(paths, args.bench_contexts, args.model, args.threads,
                                            weights=loaded.weights)
        print_table(f"bench selection (dev), {args.bench_contexts} contexts", metrics["bench"])
    metrics["total_seconds"] = round(time.perf_counter() - began, 1)
    for name, head in heads.items():
        head.meta["metrics"] = metrics
        head.save(paths[name], SAVE_DTYPES[args.save_dtype])  # again, with the metrics
    print(f"\ncheckpoints: {', '.join(str(p) for p in paths.values())}; "
          f"{metrics['total_seconds']:.0f} s in all")
    return metrics


if __name__ == "__main__":
    main()
