"""Grouped generation: the only place where requests become tensors.

A batch holds one or more groups; a group holds members (questions) whose prompts share a
token prefix. For a batch:
  1. the shared prefix of every group (longest common token prefix of its members' prompts)
     is prefilled once, the groups left-padded against each other;
  2. the prefix KV cache is expanded to one row per member;
  3. the rest of every prompt (the suffix) is prefilled in one left-padded forward pass whose
     position ids continue each row's real positions and skip the pads;
  4. decoding feeds one token per row; CSA mixes the newest hidden states within each group
     and the LM head runs on that one position. Finished rows leave the batch.
With CSA off (or untrained) every member gets exactly the tokens that decoding its prompt
alone would give: grouping changes the cost, never the content.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from model.csa import CrossSequenceAttention
from model.sampling import SamplingParams, make_generator, sample_token
from model.text_stream import TextStream


class EngineInputError(ValueError):
    """A request the engine cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(eq=False)
class Member:
    """One question of a group: its prompt, its sampling params and a handle for the caller."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    tag: object = None  # echoed back in events, for the caller to route them
    _aborted: threading.Event = field(default_factory=threading.Event, repr=False)

    def abort(self) -> None:
        """Thread-safe: the member finishes at the next step with reason "abort"."""
        self._aborted.set()

    @property
    def is_aborted(self) -> bool:
        return self._aborted.is_set()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole prompt: what an API bills
    cached_tokens: int  # prompt tokens reused from the group's shared prefix, not recomputed
    completion_tokens: int

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class TokenEvent:
    member: Member
    token_id: int | None  # None when a member ends without a new token (abort)
    text: str  # newly released text, possibly empty
    finish_reason: str | None = None  # "stop", "length" or "abort" on a member's last event
    usage: Usage | None = None  # on a member's last event


@dataclass(eq=False)
class _Row:
    """Decoding state of one member."""

    member: Member
    group_index: int
    cached_tokens: int
    stream: TextStream
    generator: torch.Generator | None
    stop_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)

    def usage(self) -> Usage:
        return Usage(len(self.member.prompt_ids), self.cached_tokens, len(self.output_ids))


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix, leaving every prompt at least one token of suffix (the last
    prompt token must run per row to produce that row's first logits)."""
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, L], mask [B, L] (1 = real token), L = longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


class GroupedEngine:
    def __init__(self, model, tokenizer, csa: CrossSequenceAttention | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.csa = csa.to(model.device, model.dtype) if csa is not None else None
        self.body = model.get_decoder()  # transformer without LM head; output is final-normed
        self.lm_head = model.get_output_embeddings()
        self.max_context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_member(self, member: Member) -> None:
        """Raises EngineInputError for a member that cannot be served as asked."""
        if not member.prompt_ids:
            raise EngineInputError("the prompt is empty", "messages")
        problems = member.params.problems()
        if problems:
            raise EngineInputError(problems[0], problems[0].split(":")[0])
        if any(not 0 <= t < self.vocab_size for t in member.prompt_ids):
            raise EngineInputError("the prompt holds token ids outside the vocabulary", "prompt")
        needed = len(member.prompt_ids) + member.params.max_tokens
        if needed > self.max_context:
            raise EngineInputError(
                f"this model's maximum context length is {self.max_context} tokens, but "
                f"{needed} were requested ({len(member.prompt_ids)} in the prompt, "
                f"{member.params.max_tokens} for the completion)",
                "max_tokens" if len(member.prompt_ids) < self.max_context else "messages",
            )

    def generate(self, groups: Sequence[Sequence[Member]]) -> Iterator[TokenEvent]:
        """Runs a batch of groups to completion, yielding events as tokens are produced."""
        for index, group in enumerate(groups):
            if not group:
                raise EngineInputError(f"group {index} has no members")
            for member in group:
                self.check_member(member)
        if not groups:
            return
        rows, prefix_lengths = self._make_rows(groups)
        hidden, cache, mask, positions = self._prefill(groups, rows, prefix_lengths)
        yield from self._decode(rows, hidden, cache, mask, positions)

    def _make_rows(self, groups) -> tuple[list[_Row], list[int]]:
        rows, prefix_lengths = [], []
        for group_index, group in enumerate(groups):
            prefix = shared_prefix_length([m.prompt_ids for m in group])
            prefix_lengths.append(prefix)
            for position, member in enumerate(group):
                rows.append(
                    _Row(
                        member=member,
                        group_index=group_index,
                        # the first member pays for the prefix; the others reuse it
                        cached_tokens=prefix if position else 0,
                        stream=TextStream(self.tokenizer, member.params.stop),
                        generator=make_generator(member.params, self.device),
                        stop_token_ids=self.eos_token_ids | set(member.params.stop_token_ids),
                    )
                )
        return rows, prefix_lengths

    @torch.inference_mode()
    def _prefill(self, groups, rows: list[_Row], prefix_lengths: list[int]):
        device = self.device
        cache = DynamicCache(config=self.model.config)
        group_of_row = torch.tensor([r.group_index for r in rows], device=device)
        row_prefix = torch.tensor([prefix_lengths[r.group_index] for r in rows], device=device)
        if max(prefix_lengths) > 0:
            prefixes = [list(g[0].prompt_ids[:n]) for g, n in zip(groups, prefix_lengths)]
            ids, mask = left_pad(prefixes, self.pad_id, device)
            self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
            cache.batch_select_indices(group_of_row)  # one copy of its group's prefix per row
            prefix_mask = mask[group_of_row]
        else:
            prefix_mask = torch.zeros((len(rows), 0), dtype=torch.long, device=device)
        suffixes = [list(r.member.prompt_ids[prefix_lengths[r.group_index] :]) for r in rows]
        ids, suffix_mask = left_pad(suffixes, self.pad_id, device)
        # [B, S]: positions continue after each row's real prefix; pads get a dummy position
        positions = row_prefix[:, None] + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([prefix_mask, suffix_mask], dim=-1)
        hidden = self._forward(ids, mask, positions, cache)
        next_positions = torch.tensor([len(r.member.prompt_ids) for r in rows], device=device)
        return hidden, cache, mask, next_positions

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """-> final normed hidden state of each row's last input token, [B, d]."""
        out = self.body(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    @torch.inference_mode()
    def _decode(self, rows, hidden, cache, mask, positions) -> Iterator[TokenEvent]:
        device = self.device
        group_ids = torch.tensor([r.group_index for r in rows], device=device)
        while True:
            tokens = self._next_tokens(rows, hidden, group_ids)
            keep = []
            for index, (row, token) in enumerate(zip(rows, tokens)):
                event = self._advance(row, token)
                yield event
                if event.finish_reason is None:
                    keep.append(index)
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch, CSA included
                select = torch.tensor(keep, device=device)
                cache.batch_select_indices(select)
                rows = [rows[i] for i in keep]
                mask, positions, group_ids = mask[select], positions[select], group_ids[select]
            ids = torch.tensor([[r.output_ids[-1]] for r in rows], device=device)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            hidden = self._forward(ids, mask, positions[:, None], cache)
            positions = positions + 1

    def _next_tokens(self, rows: list[_Row], hidden: torch.Tensor, group_ids) -> list[int | None]:
        """One token per row (None for an aborted row): CSA, LM head, then sampling."""
        if self.csa is not None:
            active = torch.ones(len(rows), dtype=torch.bool, device=hidden.device)
            hidden = self.csa(hidden, group_ids, active)
        logits = self.lm_head(hidden)
        if self.csa is not None and (delta := self.csa.head_delta(hidden)) is not None:
            logits = logits + delta
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int | None] = []
        for index, row in enumerate(rows):
            if row.member.is_aborted:
                tokens.append(None)
            elif row.member.params.is_greedy:
                tokens.append(greedy[index])
            else:
                tokens.append(sample_token(logits[index], row.member.params, row.generator))
        return tokens

    def _advance(self, row: _Row, token: int | None) -> TokenEvent:
        """Appends `token` to `row` and decides whether the row has finished."""
        if token is None:
            return TokenEvent(row.member, None, "", "abort", row.usage())
        row.output_ids.append(token)
        if token in row.stop_token_ids:
            return TokenEvent(row.member, token, row.stream.flush(), "stop", row.usage())
        text = row.stream.add(token)
        if row.stream.is_stopped:
            return TokenEvent(row.member, token, text, "stop", row.usage())
        if len(row.output_ids) >= row.member.params.max_tokens:
            return TokenEvent(row.member, token, text + row.stream.flush(), "length", row.usage())
        return TokenEvent(row.member, token, text)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids
