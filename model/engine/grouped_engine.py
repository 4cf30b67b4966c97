"""The step-level engine: `add(group)` queues a group of members (questions whose prompts share a
prefix); `step()` runs one forward pass and returns the token events it produced. Between any
two steps new groups are admitted and finished or aborted rows leave, so no request waits for
another's whole generation. One step:
  1. the scheduler (`model.engine.scheduler`) admits what fits and picks the step's work: one
     decode token of every generating row, and prefill chunks up to the step's budget;
  2. the work becomes one flat batch (`model.engine.batch`) and runs through the forward pass,
     replayed from a CUDA graph when it can be;
  3. the LM head (behind the group head, for groups that chose grouped QA) gives each
     decoding row, and each row whose prompt is now computed and whose group is ready, its
     next token; rows that stop leave.
With CSA off (or untrained) every member gets exactly the tokens that decoding its prompt
alone would give: grouping and caching change the cost, never the content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from model.engine.batch import build_step
from model.engine.groups import Group, Row
from model.engine.kv_pool import KVPool
from model.engine.limits import EngineLimits
from model.engine.options import (
    DECODE_GRAPH_ROWS,
    KV_CACHE_MB,
    MAX_PREFILL_TOKENS,
    MAX_PROPOSAL_TOKENS,
    POOL_CONTEXTS,
    TOKEN_SHARE,
    per_device,
)
from model.engine.request import EngineCounters, Member, TokenEvent
from model.engine.sampling import accept, make_generator, token_chooser
from model.engine.scheduler import Scheduler
from model.engine.speculation import SpeculationOptions
from model.engine.text_stream import TextStream
from model.forward.cuda_graphs import DecodeGraphs
from model.forward.decoder import DecoderForward, StepInputs
from model.head.group_head import GroupHead

log = logging.getLogger(__name__)


@dataclass(eq=False)
class MemberOutput:
    """What turns a member's logits into its tokens and text."""

    stream: TextStream
    generator: torch.Generator | None
    stop_token_ids: frozenset[int]


class GroupedEngine:
    """Not thread-safe: one thread calls `add` and `step`; `Member.abort` is safe from any."""

    def __init__(self, model, tokenizer, csa: GroupHead | None = None, *,
                 kv_cache_mb: float | None = None, max_prefill_tokens: int | None = None,
                 decode_graph_rows: int | None = None, speculate: bool = False,
                 max_proposal_tokens: int = MAX_PROPOSAL_TOKENS):
        """None: the device's default (`model.engine.options`). `decode_graph_rows` 0 turns
        the decode graphs off; on a CPU a positive value runs their padded steps eagerly (a
        check of the padding: a server on a CPU passes 0, see `open_engine`). `speculate`:
        decoding rows verify proposed tokens where they pay (`model.engine.speculation`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.csa = csa.to(model.device, model.dtype) if csa is not None else None
        self.forward = DecoderForward(model)
        self.lm_head = model.get_output_embeddings()
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer))
        self.pool = self._make_pool(kv_cache_mb)
        self.graphs = self._make_graphs(decode_graph_rows)
        self.limits = EngineLimits(int(model.config.max_position_embeddings),
                                   self.pool.capacity, int(model.config.vocab_size))
        if max_prefill_tokens is None:
            max_prefill_tokens = per_device(MAX_PREFILL_TOKENS, self.device.type)
        speculation = SpeculationOptions(speculate, max_proposal_tokens,
                                         per_device(TOKEN_SHARE, self.device.type))
        self.scheduler = Scheduler(self.pool.capacity, max_prefill_tokens, speculation,
                                   lockstep_trained=self.csa is not None)
        self._outputs: dict[Member, MemberOutput] = {}
        # the last prompt token's hidden state of rows whose group has not started yet
        self._prompt_states: dict[Member, torch.Tensor] = {}

    def _make_pool(self, kv_cache_mb: float | None) -> KVPool:
        shape, dtype = self.forward.pool_shape, self.model.dtype
        if kv_cache_mb is not None:
            return KVPool.with_megabytes(shape, kv_cache_mb, dtype, self.device)
        capacity = int(per_device(KV_CACHE_MB, self.device.type) * 2**20)
        capacity //= shape.bytes_per_token(dtype)
        most = POOL_CONTEXTS * int(self.model.config.max_position_embeddings)
        return KVPool(shape, min(capacity, most), dtype, self.device)

    def _make_graphs(self, max_rows: int | None) -> DecodeGraphs | None:
        if max_rows is None:
            max_rows = per_device(DECODE_GRAPH_ROWS, self.device.type)
        if max_rows <= 0 or not self.forward.can_replay:
            return None
        try:
            return DecodeGraphs(self.forward, self.pool.kv, self.pool.scratch_slot, max_rows,
                                capture=self.device.type == "cuda")
        except RuntimeError as exc:  # a capture the driver refuses: slower, still serving
            log.warning("capturing the decode graphs failed, decode steps run eagerly: %s", exc)
            return None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def cache(self):
        return self.scheduler.cache

    @property
    def max_prefill_tokens(self) -> int:
        return self.scheduler.max_prefill_tokens

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def counters(self) -> EngineCounters:
        return self.scheduler.counters()

    def add(self, members: Sequence[Member], uses_trained_head: bool = True) -> None:
        """Queues one group, checked by `limits.check_group` (`uses_trained_head`: CSA and the
        LM-head adapter apply to it)."""
        assert self.limits.fits(members), "a group the limits refuse was added"
        for member in members:
            params = member.params
            stops = frozenset() if params.ignore_eos else self.eos_token_ids
            self._outputs[member] = MemberOutput(TextStream(self.tokenizer, params.stop),
                                                 make_generator(params, self.device),
                                                 stops | set(params.stop_token_ids))
        self.scheduler.add(Group(list(members), uses_trained_head))

    def generate(self, groups: Sequence[Sequence[Member]]) -> Iterator[TokenEvent]:
        """Checks `groups`, then runs them (and whatever else was added) until they all
        finish. Raises EngineInputError for a group the limits refuse, before running any."""
        for group in groups:
            self.limits.check_group(group)
        for group in groups:
            self.add(group)
        while self.has_work:
            events = self.step()
            if not events and self.scheduler.is_idle:
                raise RuntimeError("the engine has waiting groups but cannot admit any")
            yield from events

    # --- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        began = time.perf_counter()  # the step's whole time, its proposals' lookups included
        events = self._forget(self.scheduler.drop_aborted())
        work = self.scheduler.schedule()
        if work.is_empty:
            return events
        inputs, decoding = build_step(work, self.forward.scale)
        hidden = self.run_forward(inputs)
        fed = work.num_decoding_tokens
        for row, state in zip(self.scheduler.complete(work), hidden[fed:]):
            self._prompt_states[row.member] = state
        starting = self.scheduler.starting_rows()
        states = torch.cat([hidden[:fed], *(self._prompt_states.pop(row.member)[None]
                                            for row in starting)])
        events += self._write([*decoding, *starting], work.proposals, states)
        self.scheduler.observe_step(work, time.perf_counter() - began)
        return events

    def run_forward(self, inputs: StepInputs) -> torch.Tensor:
        """One step's forward (host-side inputs): replayed from a graph when it can be."""
        if self.graphs is not None and self.graphs.fits(inputs):
            return self.graphs.run(inputs)
        return self.forward(inputs.to(self.device), self.pool.kv)

    # --- tokens out ------------------------------------------------------------------------

    def _write(self, rows: list[Row], proposals: dict[Row, list[int]],
               states: torch.Tensor) -> list[TokenEvent]:
        """Each row's next tokens from its final hidden states: one position, or its last
        token's and its proposal's. A row writes what `sampling.accept` says (what it would
        write one token a step), one token at a time, until a stop condition holds; the keys
        and values of the accepted tokens stay in the pool."""
        if not rows:
            return []
        positions = [row for row in rows for _ in range(1 + len(proposals.get(row, ())))]
        logits = self._logits(positions, states)
        greedy = logits.argmax(dim=-1).tolist()
        events, end = [], 0
        for row in rows:
            output, proposal = self._outputs[row.member], proposals.get(row, [])
            start, end = end, end + 1 + len(proposal)
            try:
                choose = token_chooser(logits[start:end], row.member.params, output.generator,
                                       greedy[start:end])
                written = accept(proposal, choose)
            except Exception as exc:  # noqa: BLE001 - one member's failure ends that member only
                events.append(self._finish(row, None, "", "error",
                                           f"{type(exc).__name__}: {exc}"))
                continue
            if proposal:
                self.scheduler.speculation.observe_verified(row, len(proposal), len(written) - 1)
            for index, token in enumerate(written):
                if index:  # the token before it was one the step fed: its key and value stay
                    self.scheduler.keep_proposed(row)
                events.append(self._advance(row, output, token))
                if events[-1].finish_reason is not None:
                    break
        return events

    def _logits(self, rows: list[Row], hidden: torch.Tensor) -> torch.Tensor:
        """The LM head; for rows of groups that chose grouped QA, the group head's logits."""
        trained = [i for i, r in enumerate(rows) if r.group.uses_trained_head]
        if self.csa is None or not trained:
            return self.lm_head(hidden)
        index = torch.tensor(trained, device=hidden.device)
        group_ids = torch.tensor([rows[i].group.serial for i in trained], device=hidden.device)
        grouped = self.csa.logits(hidden[index], group_ids, self.lm_head)
        if len(trained) == len(rows):
            return grouped
        others = torch.tensor(sorted(set(range(len(rows))) - set(trained)), device=hidden.device)
        logits = grouped.new_empty(len(rows), grouped.shape[1])
        logits[index], logits[others] = grouped, self.lm_head(hidden[others])
        return logits

    def _advance(self, row: Row, output: MemberOutput, token: int) -> TokenEvent:
        """Appends `token` to `row` and decides whether the row has finished."""
        row.write(token)
        if token in output.stop_token_ids:
            return self._finish(row, token, output.stream.flush(), "stop")
        text = output.stream.add(token)
        if output.stream.is_stopped:
            return self._finish(row, token, text, "stop")
        if len(row.output_ids) >= row.member.params.max_tokens:
            return self._finish(row, token, text + output.stream.flush(), "length")
        return TokenEvent(row.member, token, text)

    def _finish(self, row: Row, token: int | None, text: str, reason: str,
                error: str | None = None) -> TokenEvent:
        event = TokenEvent(row.member, token, text, reason, self.scheduler.finish(row), error)
        return self._forget([event])[0]

    def _forget(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """Drops what the engine kept for the members that `events` end."""
        for event in events:
            self._outputs.pop(event.member, None)
            self._prompt_states.pop(event.member, None)
        return events

    def reset(self) -> list[Member]:
        """Forgets everything (after a failed step): the pool is empty again. Returns the
        members that were waiting or running, for the caller to fail."""
        self._outputs.clear()
        self._prompt_states.clear()
        return self.scheduler.reset()

    def abort_all(self) -> Iterable[TokenEvent]:
        """Ends everything (shutdown)."""
        for group in [*self.scheduler.waiting, *self.scheduler.running]:
            for member in group.members:
                member.abort()
        return self._forget(self.scheduler.drop_aborted())


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids
