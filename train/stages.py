"""The two training stages of the group head, base model frozen, fp32 master weights:
  1. the LM-head adapter alone (a residual MLP on the LM head's input + a low-rank logits delta),
     CSA off: the adapter-only control;
  2. CSA + gate on top of that adapter, which stays frozen. At G=1 it is exactly the control,
     so the G>1 rows measure what CSA adds.
Each stage records in the head's metadata what it trained, its settings and its history.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from model.head.group_head import CROSS_ATTENTION_LAYERS, GroupHead, GroupHeadConfig
from train.features import Features
from train.loop import TrainSettings, train


def new_head(loaded, args: argparse.Namespace, use_csa: bool, base: dict) -> GroupHead:
    """An untrained head for the loaded base model; `base` holds the base model's name and
    signature and the metadata both stages share."""
    config = GroupHeadConfig(
        hidden_size=loaded.model.config.hidden_size, num_heads=args.num_heads,
        adapter_rank=args.adapter_rank, head_mlp=args.head_mlp,
        vocab_size=loaded.model.config.vocab_size, use_csa=use_csa,
        base_model=base["base_model"], base_signature=base["base_signature"],
    )
    return GroupHead(config, meta=json.loads(json.dumps(base["meta"])))


def fit(name: str, head: GroupHead, loaded, train_features: Features, heldout: Features,
        settings: TrainSettings) -> None:
    """Trains the parameters of `head` that require grad, with a progress bar; records what was
    trained and the history in the head's metadata."""
    trained = sorted({n.split(".")[0] for n, p in head.named_parameters() if p.requires_grad})
    steps_per_epoch = -(-len(train_features.targets) // settings.batch_tokens)
    steps = min(settings.max_steps or 10**9, settings.epochs * steps_per_epoch)
    began = time.perf_counter()
    with tqdm(total=steps, desc=f"train {name}", unit="step", mininterval=1.0) as bar:
        def on_step(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()

        history = train(head, loaded.model.get_output_embeddings(), train_features, heldout,
                        settings, on_step)
    best = min(history, key=lambda h: h["heldout_loss"])
    head.meta.update(
        trained=trained, frozen="the whole base model, its LM head and embeddings included",
        settings=asdict(settings), history=history, best=best,
        train_seconds=round(time.perf_counter() - began, 1),
        parameters=sum(p.numel() for p in head.parameters()),
    )
    print(f"{name}: best at epoch {best['epoch']}, held-out loss {best['heldout_loss']:.4f} "
          f"(from {history[0]['heldout_loss']:.4f})", file=sys.stderr)


def train_adapter(loaded, train_features, heldout, settings, args, base) -> GroupHead:
    """The control: the LM-head adapter alone (head MLP + low-rank delta), CSA off."""
    torch.manual_seed(settings.seed)
    adapter = new_head(loaded, args, False, base)
    fit("adapter-only", adapter.requires_grad_(True), loaded, train_features, heldout, settings)
    return adapter


def train_csa(adapter, loaded, train_features, heldout, settings, args, base) -> GroupHead:
    """CSA + gate trained on top of the trained adapter, which stays frozen: at G=1 (no peers)
    the result is exactly the adapter-only control, and it starts as exactly that at any G."""
    torch.manual_seed(settings.seed)
    head = new_head(loaded, args, True, base)
    missing, unexpected = head.load_state_dict(adapter.state_dict(), strict=False)
    assert not unexpected and all(
        n.split(".")[0] in CROSS_ATTENTION_LAYERS for n in missing
    ), missing
    head.requires_grad_(False)
    for name in CROSS_ATTENTION_LAYERS:
        getattr(head, name).requires_grad_(True)
    fit("csa+adapter", head, loaded, train_features, heldout, settings)
    head.meta["adapter"] = {
        "trained_in": "stage 1, the adapter-only control (frozen in stage 2)",
        **{key: adapter.meta[key] for key in ("trained", "settings", "best")},
    }
    return head


def stored(head: GroupHead, path: Path, dtype: torch.dtype) -> GroupHead:
    """Saves `head` to `path` and reads it back."""
    head.save(path, dtype)
    return GroupHead.load(path)
