"""Train CSA (+ gate) and a low-rank LM-head adapter on SQuAD v1.1 train, base model frozen.

    python -m model.train_csa                  # default recipe: embedded model, shipped checkpoints
    python -m model.train_csa --bench-contexts 0 --eval-contexts 0   # train only, no evaluation
    python -m model.train_csa --model tiny-random --out /tmp/csa --max-steps 5 \
        --eval-contexts 0 --bench-contexts 0   # smoke run

Recipe: one (prompt, target) example per question, prompt = the serving prompt, target =
`<answer>{first gold answer}</answer>` + the end-of-turn token. Groups are passages with 1-5
questions. One teacher-forced forward per batch of passages gives every answer step's final
hidden state; those are cached (they do not depend on the trained weights) and training runs on
them. Two stages, fp32 master weights, AdamW:
  1. the LM-head adapter alone (a residual MLP on the LM head's input + a low-rank logits delta),
     CSA off: the control, written to `OUT-adapter-only`;
  2. CSA + gate on top of that adapter, which stays frozen: written to `OUT`. At G=1 it is
     exactly the control, so the G>1 rows measure what CSA adds.
Held-out passages of the train file give the validation loss (the best weights are kept, the
untrained start included) and a generation check; the dev set is never trained on. Weights are
stored in fp16 (`--save-dtype`) and evaluated as stored. Checkpoints hold the base model id and
weights hash, sizes, what is trained, the arguments, history and metrics. Finally the three
controls (base, adapter alone, CSA + adapter) run on the bench selection through
`python -m bench.engine_bench`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from model import train_data
from model.checkpoints import CHECKPOINT_DIR, SHIPPED
from model.csa import CrossSequenceAttention, CSAConfig
from model.engine import GroupedEngine
from model.loading import cache_dir, load_model, weights_fingerprint
from model.train_data import Features
from model.train_eval import evaluate
from model.train_loop import TrainSettings, train

DATA_DIR = Path(__file__).resolve().parent.parent / "bench" / "data" / "squad"
DEFAULT_TRAIN = DATA_DIR / "train-v1.1-first11.json"
ADAPTER_SUFFIX = "-adapter-only"  # the control's checkpoint sits next to the CSA one
SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
CSA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "norm_h", "norm_a", "gate_in", "gate_out")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--train", default=str(DEFAULT_TRAIN), help="SQuAD v1.1 train JSON")
    parser.add_argument("--out", default=None, help="checkpoint dir (default: the shipped one)")
    parser.add_argument("--heldout", type=int, default=60, help="held-out train passages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="adapter epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    parser.add_argument("--csa-epochs", type=int, default=2)
    parser.add_argument("--csa-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=TrainSettings.weight_decay)
    parser.add_argument("--batch-tokens", type=int, default=TrainSettings.batch_tokens)
    parser.add_argument("--max-group", type=int, default=TrainSettings.max_group)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each stage after N steps")
    parser.add_argument("--adapter-rank", type=int, default=32, help="low-rank logits delta")
    parser.add_argument("--head-mlp", type=int, default=1024, help="head MLP width (0: none)")
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--passages-per-batch", type=int, default=4, help="feature forwards")
    parser.add_argument("--eval-contexts", type=int, default=20, help="held-out generation")
    parser.add_argument("--eval-group-sizes", default="5")
    parser.add_argument("--eval-max-tokens", type=int, default=96)
    parser.add_argument("--bench-contexts", type=int, default=20, help="0 skips the bench")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the features")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16",
                        help="dtype of the stored weights (float16 halves the checkpoint)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace, model_name: str) -> Path:
    if args.out:
        return Path(args.out)
    if model_name not in SHIPPED:
        raise SystemExit(f"no shipped checkpoint folder for {model_name}: pass --out DIR")
    return CHECKPOINT_DIR / SHIPPED[model_name]


def cached_features(loaded, examples, fingerprint: str, args) -> Features:
    """The answer-step hidden states of every example, from the cache when possible."""
    path = cache_dir() / "csa-features" / f"{train_data.features_key(fingerprint, examples)}.pt"
    features = None if args.no_cache else train_data.load_features(path)
    if features is not None:
        print(f"features: {path} (cached)", file=sys.stderr)
        return features
    began = time.perf_counter()
    with tqdm(total=len(examples), desc="features", unit="q", mininterval=1.0) as bar:
        features = train_data.compute_features(
            loaded.model.get_decoder(), examples, loaded.tokenizer.pad_token_id,
            args.passages_per_batch, bar.update,
        )
    print(f"features: {time.perf_counter() - began:.0f} s -> {path}", file=sys.stderr)
    train_data.save_features(features, path)
    return features


def module_config(loaded, args, use_csa: bool, base: dict) -> CSAConfig:
    return CSAConfig(
        hidden_size=loaded.model.config.hidden_size, num_heads=args.num_heads,
        adapter_rank=args.adapter_rank, head_mlp=args.head_mlp,
        vocab_size=loaded.model.config.vocab_size, use_csa=use_csa,
        base_model=base["base_model"], base_fingerprint=base["base_fingerprint"],
        meta=json.loads(json.dumps(base["meta"])),
    )


def fit(name: str, csa, loaded, train_features, heldout, settings: TrainSettings) -> None:
    """Trains the parameters of `csa` that require grad, with a progress bar; records what was
    trained and the history in the module's config."""
    trained = sorted({n.split(".")[0] for n, p in csa.named_parameters() if p.requires_grad})
    steps_per_epoch = -(-len(train_features.targets) // settings.batch_tokens)
    steps = min(settings.max_steps or 10**9, settings.epochs * steps_per_epoch)
    began = time.perf_counter()
    with tqdm(total=steps, desc=f"train {name}", unit="step", mininterval=1.0) as bar:
        def on_step(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()

        history = train(csa, loaded.model.get_output_embeddings(), train_features, heldout,
                        settings, on_step)
    best = min(history, key=lambda h: h["heldout_loss"])
    csa.config.meta.update(
        trained=trained, frozen="the whole base model, its LM head and embeddings included",
        settings=asdict(settings), history=history, best=best,
        train_seconds=round(time.perf_counter() - began, 1),
        parameters=sum(p.numel() for p in csa.parameters()),
    )
    print(f"{name}: best at epoch {best['epoch']}, held-out loss {best['heldout_loss']:.4f} "
          f"(from {history[0]['heldout_loss']:.4f})", file=sys.stderr)


def train_adapter(loaded, train_features, heldout, settings, args, base) -> CrossSequenceAttention:
    """The control: the LM-head adapter alone (head MLP + low-rank delta), CSA off."""
    torch.manual_seed(settings.seed)
    adapter = CrossSequenceAttention(module_config(loaded, args, False, base))
    fit("adapter-only", adapter.requires_grad_(True), loaded, train_features, heldout, settings)
    return adapter


def train_csa(adapter, loaded, train_features, heldout, settings, args, base):
    """CSA + gate trained on top of the trained adapter, which stays frozen: at G=1 (no peers)
    the result is exactly the adapter-only control, and it starts as exactly that at any G."""
    torch.manual_seed(settings.seed)
    csa = CrossSequenceAttention(module_config(loaded, args, True, base))
    missing, unexpected = csa.load_state_dict(adapter.state_dict(), strict=False)
    assert not unexpected and all(n.split(".")[0] in CSA_LAYERS for n in missing), missing
    csa.requires_grad_(False)
    for name in CSA_LAYERS:
        getattr(csa, name).requires_grad_(True)
    fit("csa+adapter", csa, loaded, train_features, heldout, settings)
    csa.config.meta["adapter"] = {
        "trained_in": "stage 1, the adapter-only control (frozen in stage 2)",
        **{key: adapter.config.meta[key] for key in ("trained", "settings", "best")},
    }
    return csa


def stored(module: CrossSequenceAttention, path: Path, dtype: torch.dtype):
    """Saves `module` to `path` and reads it back."""
    module.save(path, dtype)
    return CrossSequenceAttention.load(path)


def heldout_generation(loaded, modules: dict, passages, args) -> dict:
    """EM/F1 of every control on the held-out passages with at least five questions."""
    chosen = [p for p in passages if len(p.questions) >= 5][: args.eval_contexts]
    sizes = [int(s) for s in args.eval_group_sizes.split(",")]
    results = {}
    total = len(modules) * len(sizes) * 5 * len(chosen)
    with tqdm(total=total, desc="held-out eval", unit="q", mininterval=1.0) as bar:
        for name, csa in modules.items():
            engine = GroupedEngine(loaded.model, loaded.tokenizer, csa)
            results[name] = {
                f"G{size}": evaluate(engine, chosen, size, args.eval_max_tokens,
                                     batch_groups=max(1, 5 // size), on_questions=bar.update)
                for size in sizes
            }
    return results


def bench_controls(args: argparse.Namespace, paths: dict) -> dict:
    """Runs `python -m bench.engine_bench` for every control (a subprocess: `model/` does not
    import `bench/`) and returns its rows without the answers."""
    results = {}
    for name, csa in {"base": "off", **{k: str(v) for k, v in paths.items()}}.items():
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "bench.json"
            command = [sys.executable, "-m", "bench.engine_bench", "--contexts",
                       str(args.bench_contexts), "--group-sizes", "1,5", "--csa", csa,
                       "--json", str(report)]
            command += ["--model", args.model] if args.model else []
            command += ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(command, check=True)
            rows = json.loads(report.read_text())["results"]
        results[name] = {
            f"G{row['group_size']}": {k: v for k, v in row.items() if k != "answers"}
            for row in rows
        }
    return results


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}\n| control | G | EM | F1 | tags |\n|---|---:|---:|---:|---:|")
    for name, by_size in results.items():
        for size, row in by_size.items():
            print(f"| {name} | {size[1:]} | {100 * row['em']:.1f} | {100 * row['f1']:.1f} "
                  f"| {100 * row.get('tag_rate', 0):.0f}% |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    loaded = load_model(args.model, threads=args.threads)
    out = output_dir(args, loaded.name)
    paths = {"adapter-only": Path(f"{out}{ADAPTER_SUFFIX}"), "csa+adapter": out}
    fingerprint = weights_fingerprint(loaded.model)
    passages = train_data.read_squad(args.train)
    train_ids, heldout_ids = train_data.split_passages(len(passages), args.heldout, args.seed)
    examples = train_data.make_examples(loaded.tokenizer, passages)
    features = cached_features(loaded, examples, fingerprint, args)
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
    base = {"base_model": loaded.name, "base_fingerprint": fingerprint,
            "meta": {"train_args": {**vars(args), "train": Path(args.train).name}, "data": data}}
    adapter = train_adapter(loaded, train_features, heldout, adapter_settings, args, base)
    csa = train_csa(adapter, loaded, train_features, heldout, csa_settings, args, base)
    modules = {"adapter-only": adapter, "csa+adapter": csa}
    metrics = {"heldout_loss": {
        "base": adapter.config.meta["history"][0]["heldout_loss"],
        **{name: m.config.meta["best"]["heldout_loss"] for name, m in modules.items()},
    }}
    # evaluated as stored: the weights in the checkpoint files, not the fp32 masters
    modules = {name: stored(module, paths[name], SAVE_DTYPES[args.save_dtype])
               for name, module in modules.items()}
    if args.eval_contexts:
        metrics["heldout"] = heldout_generation(loaded, {"base": None, **modules},
                                                [passages[i] for i in heldout_ids], args)
        print_table("held-out passages (train file), generation", metrics["heldout"])
    if args.bench_contexts:
        metrics["bench"] = bench_controls(args, paths)
        print_table(f"bench selection (dev), {args.bench_contexts} contexts", metrics["bench"])
    metrics["total_seconds"] = round(time.perf_counter() - began, 1)
    for name, module in modules.items():
        module.config.meta["metrics"] = metrics
        module.save(paths[name], SAVE_DTYPES[args.save_dtype])  # again, with the metrics
    print(f"\ncheckpoints: {', '.join(str(p) for p in paths.values())}; "
          f"{metrics['total_seconds']:.0f} s in all")
    return metrics


if __name__ == "__main__":
    main()
