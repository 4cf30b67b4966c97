"""The training loop of a group head on cached answer-step features (see `train/features.py`).

A batch is a set of groups (rows of one passage, 1 to `max_group` rows each). CSA at answer step
t mixes the step-t hidden states of a group's rows that are still active (t < their target
length), exactly as decoding does; the loss is the cross-entropy of the answer tokens only.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.head.group_head import GroupHead
from train.features import Features


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_tokens: int = 512  # answer tokens per optimizer step
    max_group: int = 5
    warmup_share: float = 0.05
    evals_per_epoch: int = 4  # held-out loss measurements per epoch (the best weights are kept)
    max_steps: int = 0  # 0: no limit; a smoke run stops after this many steps
    seed: int = 0


def make_groups(features: Features, max_group: int, rng: random.Random | None) -> list:
    """Rows grouped by passage: shuffled and cut into groups of random size 1..max_group, or,
    with rng None, cut in file order into groups of max_group (the fixed held-out grouping)."""
    rows_of: dict[int, list[int]] = {}
    for row, passage in enumerate(features.row_passages.tolist()):
        rows_of.setdefault(passage, []).append(row)
    groups = []
    for rows in rows_of.values():
        if rng is not None:
            rng.shuffle(rows)
        start = 0
        while start < len(rows):
            size = rng.randint(1, max_group) if rng is not None else max_group
            groups.append(rows[start : start + size])
            start += size
    if rng is not None:
        rng.shuffle(groups)
    return groups


def pack_batches(groups: list, row_lengths: list[int], batch_tokens: int) -> list:
    """Whole groups packed into batches of about `batch_tokens` answer tokens."""
    batches, current, tokens = [], [], 0
    for group in groups:
        size = sum(row_lengths[r] for r in group)
        if current and tokens + size > batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(group)
        tokens += size
    return batches + ([current] if current else [])


def batch_tensors(features: Features, groups: list) -> tuple[torch.Tensor, ...]:
    """-> hidden [N, d], targets [N], group_ids [N] for every answer step of the batch's rows.
    group_ids is (group, step): CSA mixes a group's rows at the same step only; a row past its
    last step has no entry, so it no longer feeds CSA."""
    starts, lengths = features.row_starts, features.row_lengths
    span = int(lengths.max()) + 1
    token_index, group_ids = [], []
    for group_number, group in enumerate(groups):
        for row in group:
            steps = torch.arange(int(lengths[row]))
            token_index.append(int(starts[row]) + steps)
            group_ids.append(group_number * span + steps)
    index = torch.cat(token_index)
    return features.hidden[index], features.targets[index], torch.cat(group_ids)


def answer_logits(
    head: GroupHead | None, lm_head, hidden: torch.Tensor, group_ids: torch.Tensor
) -> torch.Tensor:
    """The engine's head step (`GroupHead.logits`), or the bare LM head without a head."""
    return lm_head(hidden) if head is None else head.logits(hidden, group_ids, lm_head)


def answer_loss(head, lm_head, features: Features, groups: list) -> torch.Tensor:
    hidden, targets, group_ids = batch_tensors(features, groups)
    return F.cross_entropy(answer_logits(head, lm_head, hidden, group_ids), targets)


@torch.no_grad()
def heldout_loss(head, lm_head, features: Features, settings: TrainSettings) -> float:
    """Mean answer-token loss over the held-out rows, grouped in file order."""
    groups = make_groups(features, settings.max_group, None)
    lengths = features.row_lengths.tolist()
    total, count = 0.0, 0
    for batch in pack_batches(groups, lengths, settings.batch_tokens * 4):
        tokens = sum(lengths[r] for g in batch for r in g)
        total += float(answer_loss(head, lm_head, features, batch)) * tokens
        count += tokens
    return total / max(count, 1)


def _optimizer(head: GroupHead, settings: TrainSettings) -> torch.optim.AdamW:
    """Weight decay on matrices only: decaying the gate bias would open the gate by itself."""
    matrices = [p for p in head.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in head.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)


def _lr_factor(step: int, total: int, warmup_share: float) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    warmup = max(1, int(total * warmup_share))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    head: GroupHead, lm_head, train_features: Features, heldout: Features,
    settings: TrainSettings, on_step: Callable[[float], None] | None = None,
) -> list[dict]:
    """Trains the parameters of `head` that require grad (fp32 master weights, AdamW) and keeps
    the weights with the lowest held-out loss, measured before training and then
    `settings.evals_per_epoch` times an epoch: a module that starts as the identity can only
    improve on its start. Returns the history of those measurements."""
    head.float()
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = _optimizer(head, settings)
    lengths = train_features.row_lengths.tolist()
    steps_per_epoch = math.ceil(sum(lengths) / settings.batch_tokens)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total = min(total, settings.max_steps)
    eval_every = max(1, steps_per_epoch // settings.evals_per_epoch)
    start = heldout_loss(head.eval(), lm_head, heldout, settings)
    history = [{"epoch": 0.0, "steps": 0, "train_loss": None, "heldout_loss": start}]
    best, step, losses = (start, copy.deepcopy(head.state_dict())), 0, []
    head.train()
    while step < total:
        groups = make_groups(train_features, settings.max_group, rng)
        for batch in pack_batches(groups, lengths, settings.batch_tokens):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, total, settings.warmup_share)
            loss = answer_loss(head, lm_head, train_features, batch)
            if loss.requires_grad:  # not when only CSA trains and no row of the batch has a peer
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(losses[-1])
            if step % eval_every == 0 or step == total:
                val = heldout_loss(head.eval(), lm_head, heldout, settings)
                head.train()
                history.append({"epoch": round(step / steps_per_epoch, 2), "steps": step,
                                "train_loss": sum(losses) / len(losses), "heldout_loss": val})
                losses = []
                if val < best[0]:
                    best = (val, copy.deepcopy(head.state_dict()))
            if step >= total:
                break
    head.load_state_dict(best[1])
    head.eval().requires_grad_(False)
    return history
