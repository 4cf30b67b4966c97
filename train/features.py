"""The teacher-forced final hidden states at every answer step of the training examples.

The base model is frozen and the group head acts only on the final normed hidden state just
before the LM head, so those hidden states do not depend on the trained weights: they are
computed once (one forward per batch of passages), cached on disk, and training runs on them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.cache import cache_dir
from model.engine.teacher_forcing import teacher_forced_states
from model.forward.decoder import DecoderForward
from train.data import Example

FEATURES_VERSION = 2  # bump when the cached features change: their layout or how they are computed


@dataclass
class Features:
    """Answer-step hidden states of many examples, flattened over (example, step).

    hidden [N, d]: the final normed hidden state that predicts targets[n];
    targets [N]; row_lengths [R] (answer steps per example, rows in order);
    row_passages [R]: index of each example's passage (rows of one passage may be grouped)."""

    hidden: torch.Tensor
    targets: torch.Tensor
    row_lengths: torch.Tensor
    row_passages: torch.Tensor

    @property
    def row_starts(self) -> torch.Tensor:
        return self.row_lengths.cumsum(0) - self.row_lengths

    @property
    def num_rows(self) -> int:
        return len(self.row_lengths)

    def subset(self, passage_indices: Sequence[int]) -> Features:
        """The rows of the given passages (passage indices are kept as they are)."""
        keep_row = torch.isin(self.row_passages, torch.tensor(list(passage_indices)))
        keep_token = keep_row.repeat_interleave(self.row_lengths)
        return Features(
            self.hidden[keep_token], self.targets[keep_token],
            self.row_lengths[keep_row], self.row_passages[keep_row],
        )


def answer_hidden_states(
    forward: DecoderForward, groups: Sequence[Sequence[Example]]
) -> list[torch.Tensor]:
    """Teacher-forced hidden states for every example of `groups`, in order: [T_i, d] each.

    A group's examples share a prompt prefix (one passage). Each example runs as its prompt and
    target without the target's last token; the state at position p predicts token p + 1, so the
    first target token comes from the last prompt token, and the T_i target tokens are predicted
    by the last T_i positions."""
    sequences = [[e.prompt_ids + e.target_ids[:-1] for e in group] for group in groups]
    num_last = [[len(e.target_ids) for e in group] for group in groups]
    return [state.float().cpu() for state in teacher_forced_states(forward, sequences, num_last)]


def compute_features(
    forward: DecoderForward, examples: Sequence[Example], passages_per_batch: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Features of `examples`, one forward per batch of passages (in order of prompt length, so
    a batch's passages are alike in size)."""
    by_passage: dict[int, list[int]] = {}
    for row, example in enumerate(examples):
        by_passage.setdefault(example.passage_index, []).append(row)
    order = sorted(by_passage.values(), key=lambda rows: len(examples[rows[0]].prompt_ids))
    hidden_of_row: list[torch.Tensor | None] = [None] * len(examples)
    for start in range(0, len(order), passages_per_batch):
        chunk = order[start : start + passages_per_batch]
        groups = [[examples[row] for row in rows] for rows in chunk]
        states = answer_hidden_states(forward, groups)
        for row, state in zip((row for rows in chunk for row in rows), states):
            hidden_of_row[row] = state
        if on_batch is not None:
            on_batch(sum(len(rows) for rows in chunk))
    return Features(
        hidden=torch.cat(hidden_of_row),
        targets=torch.tensor([t for e in examples for t in e.target_ids]),
        row_lengths=torch.tensor([len(e.target_ids) for e in examples]),
        row_passages=torch.tensor([e.passage_index for e in examples]),
    )


def features_key(base_fingerprint: str, examples: Sequence[Example]) -> str:
    """Cache key: the base weights and every token of every example."""
    digest = hashlib.sha256(f"v{FEATURES_VERSION}:{base_fingerprint}".encode())
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, example.target_ids]).encode())
    return digest.hexdigest()[:24]


def save_features(features: Features, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(vars(features), partial)
    partial.replace(path)


def load_features(path: Path) -> Features | None:
    if not path.is_file():
        return None
    return Features(**torch.load(path, weights_only=True))


def cached_features(
    loaded, examples: Sequence[Example], fingerprint: str, passages_per_batch: int,
    use_cache: bool = True,
) -> Features:
    """The answer-step hidden states of every example, from the cache when possible (and when
    `use_cache`); computed ones are written to the cache either way."""
    # the fingerprint names the base model, not its weight format: both key the features (every
    # variant of the int4 kernels computes the same bits)
    key = features_key(f"{fingerprint}:{loaded.weights}", examples)
    path = cache_dir() / "csa-features" / f"{key}.pt"
    features = load_features(path) if use_cache else None
    if features is not None:
        print(f"features: {path} (cached)", file=sys.stderr)
        return features
    began = time.perf_counter()
    with tqdm(total=len(examples), desc="features", unit="q", mininterval=1.0) as bar:
        features = compute_features(DecoderForward(loaded.model), examples, passages_per_batch,
                                    bar.update)
    print(f"features: {time.perf_counter() - began:.0f} s -> {path}", file=sys.stderr)
    save_features(features, path)
    return features
