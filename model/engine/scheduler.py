"""The engine's policy: which groups run, and what one step computes. Torch-free, so it is
tested with token ids alone (the step loop around it, with the forward and sampling, is
`grouped_engine.py`).

  - Waiting queue: groups wait in arrival order until the KV pool has room for them.
  - Admission: the oldest waiting group is admitted whole when its worst case fits (its
    uncached shared prefix + every member's rest of prompt + max_tokens), evicting cached
    prefixes nobody uses; a later group never overtakes it. Its shared prefix (the longest
    common prefix of its prompts) is matched against the prefix cache; only the unmatched part
    is computed, once, into a new node.
  - Step work: one decode token of every generating row, and queued prefill work (shared
    prefixes, then each row's rest of prompt), in order, up to `max_prefill_tokens`.
  - A group whose rows have all computed their prompts starts generating: its rows decode in
    lockstep (the group head sees its peers at the same step) and leave one by one.
  - Speculation (`model.engine.speculation`): in a step without prefill chunks, a decoding row
    may verify tokens proposed from what it, its group and its tenant have seen, when the
    step-time model says they pay. Rows of groups the group head mixes (CSA) keep their
    lockstep and never speculate.

A finished or aborted row keeps what it computed in the prefix cache and gives the rest of its
extent back. Since a group's worst case is reserved at admission, a running row never runs out
of room; taking room back from running groups (preemption) would be a policy of this module.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.engine.groups import Chunk, Group, PrefillJob, Row, extents
from model.engine.limits import shared_prefix_length
from model.engine.prefix_cache import Node, PrefixCache
from model.engine.request import EngineCounters, Member, Status, TokenEvent, Usage
from model.engine.slots import SlotAllocator
from model.engine.speculation import NO_SPECULATION, Speculation, SpeculationOptions


@dataclass(frozen=True)
class StepWork:
    """What one step computes: a token of each decoding row (with the tokens it verifies after
    it, if it speculates), then the prefill chunks."""

    decode_rows: list[Row]
    chunks: list[Chunk]
    proposals: dict[Row, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.decode_rows and not self.chunks

    @property
    def num_proposed_tokens(self) -> int:
        return sum(map(len, self.proposals.values()))

    @property
    def num_decoding_tokens(self) -> int:
        """What the decoding rows feed: each its last token, and its proposal."""
        return len(self.decode_rows) + self.num_proposed_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_decoding_tokens + sum(chunk.length for chunk in self.chunks)


class Scheduler:
    """Owns the pool's free slots and the prefix cache over them. Not thread-safe.
    `lockstep_trained`: the group head mixes the rows of groups that use it, so they never
    speculate."""

    def __init__(self, capacity: int, max_prefill_tokens: int,
                 speculation: SpeculationOptions = NO_SPECULATION,
                 lockstep_trained: bool = False):
        self.capacity = capacity  # slots of the KV pool
        self.max_prefill_tokens = max_prefill_tokens
        self.speculation = Speculation(speculation)
        self.lockstep_trained = lockstep_trained
        self.num_row_steps = 0  # decode steps of a row, since the start
        self.num_decode_tokens = 0  # tokens those steps wrote
        self.num_drafts = 0  # proposals verified
        self.num_draft_tokens = 0  # tokens in them
        self.num_accepted_tokens = 0  # of those, the ones rows wrote
        self.slots = SlotAllocator(capacity)
        self.cache = PrefixCache(self.slots)
        self.waiting: deque[Group] = deque()
        self.running: list[Group] = []
        self.jobs: deque[PrefillJob] = deque()
        self.prefix_cache_queries = 0  # prompt tokens looked up in the cache (as vLLM)
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or not all(g.is_done for g in self.running)

    @property
    def is_idle(self) -> bool:
        """Nothing to compute now (groups may still wait for room)."""
        return not self.jobs and not self.decoding_rows()

    def counters(self) -> EngineCounters:
        idle = self.slots.num_free + self.cache.evictable_tokens()
        return EngineCounters(num_waiting=sum(len(g.members) for g in self.waiting),
                              kv_cache_usage=1.0 - idle / self.capacity,
                              prefix_cache_queries=self.prefix_cache_queries,
                              prefix_cache_hits=self.prefix_cache_hits,
                              num_row_steps=self.num_row_steps,
                              num_decode_tokens=self.num_decode_tokens,
                              num_drafts=self.num_drafts,
                              num_draft_tokens=self.num_draft_tokens,
                              num_accepted_tokens=self.num_accepted_tokens)

    def add(self, group: Group) -> None:
        for member in group.members:
            member.status = Status.WAITING
        self.waiting.append(group)

    def schedule(self) -> StepWork:
        """Admits what fits, then picks this step's work."""
        self.running = [g for g in self.running if not g.is_done]
        while self.waiting and self._try_admit(self.waiting[0]):
            self.running.append(self.waiting.popleft())
        rows, chunks = self.decoding_rows(), self._take_chunks()
        if chunks:  # a prompt's first token never waits for proposals to be checked
            return StepWork(rows, chunks)
        free = [row for row in rows
                if not (self.lockstep_trained and row.group.uses_trained_head)]
        return StepWork(rows, chunks, self.speculation.proposals(free, len(rows)))

    def decoding_rows(self) -> list[Row]:
        return [r for g in self.running for r in g.rows if r.is_decoding]

    def complete(self, work: StepWork) -> list[Row]:
        """Books a step that ran; returns the rows whose prompt it completed, in step order
        (the order the forward returns their last prompt token's hidden state)."""
        for row in work.decode_rows:
            row.num_fed += 1
        self.num_row_steps += len(work.decode_rows)
        self.num_decode_tokens += len(work.decode_rows)
        self.num_drafts += len(work.proposals)
        self.num_draft_tokens += work.num_proposed_tokens
        completed = []
        for chunk in work.chunks:
            job = chunk.job
            job.num_done += chunk.length
            if job.row is not None:
                job.row.num_fed += chunk.length
                if job.is_done:
                    completed.append(job.row)
            elif job.is_done and job.node is not None:
                self.cache.unlock(job.node)
        self.jobs = deque(j for j in self.jobs if not (j.is_done or j.is_dropped))
        return completed

    def observe_step(self, work: StepWork, seconds: float) -> None:
        """The wall time of a step, for speculation's cost model: decode steps only, the ones
        that speculate (a prefill chunk's token also costs less than a decode row's: its rows
        share each weight read and each block of keys)."""
        if not work.chunks:
            self.speculation.observe_step(work.num_tokens, seconds)

    def keep_proposed(self, row: Row) -> None:
        """A token the row verified in the step was accepted and written: its key and value
        stay, and the row writes one more token than its step's one."""
        row.num_fed += 1
        self.num_decode_tokens += 1
        self.num_accepted_tokens += 1

    def starting_rows(self) -> list[Row]:
        """Rows of groups whose every prompt is now computed: they decode from now on."""
        starting = []
        for group in self.running:
            rows = [r for r in group.rows if not r.is_finished]
            if rows and all(r.member.status is Status.PREFILL and r.job is not None
                            and r.job.is_done for r in rows):
                for row in rows:
                    row.member.status = Status.DECODE
                starting += rows
        return starting

    def finish(self, row: Row) -> Usage:
        """Ends a row: what it computed stays in the prefix cache, the rest of its extent is
        freed, and its path may be evicted once no one else uses it."""
        row.member.status = Status.FINISHED
        self.cache.insert(row.leaf, row.own_tokens[: row.num_fed], row.tail_start)
        self.slots.free(row.tail_start + row.num_fed, row.tail_capacity - row.num_fed)
        self.cache.unlock(row.leaf)
        self.speculation.remember(row)
        return Usage(len(row.member.prompt_ids), row.cached_tokens, len(row.output_ids))

    def drop_aborted(self) -> list[TokenEvent]:
        """Aborted members leave: running rows as `finish` ends them, waiting ones at once."""
        events = [TokenEvent(r.member, None, "", "abort", self.finish(r))
                  for g in self.running for r in g.rows
                  if not r.is_finished and r.member.is_aborted]
        for group in list(self.waiting):
            for member in (m for m in group.members if m.is_aborted):
                member.status = Status.FINISHED
                events.append(TokenEvent(member, None, "", "abort",
                                         Usage(len(member.prompt_ids), 0, 0)))
            group.members = [m for m in group.members if not m.is_aborted]
            if not group.members:
                self.waiting.remove(group)
        return events

    def reset(self) -> list[Member]:
        """Forgets everything: the pool is empty again. Returns the members that were waiting
        or running, finished, for the caller to fail."""
        members = [m for g in self.waiting for m in g.members]
        members += [r.member for g in self.running for r in g.rows if not r.is_finished]
        for member in members:
            member.status = Status.FINISHED
        self.slots = SlotAllocator(self.capacity)
        self.cache = PrefixCache(self.slots)
        self.waiting, self.running, self.jobs = deque(), [], deque()
        return members

    # --- admission ---------------------------------------------------------------------------

    def _try_admit(self, group: Group) -> bool:
        """Reserves the group's worst case in the pool and queues its prefill; False (and
        nothing changed) when it does not fit yet."""
        prompts = [m.prompt_ids for m in group.members]
        prefix = shared_prefix_length(prompts)
        leaf = self.cache.match(group.namespace, prompts[0], prefix)
        matched = leaf.depth
        # a fully cached shared prefix: each row may reuse more of its own prompt (the same
        # question asked again); every prompt's last token always runs, for its logits
        row_leaves = [self.cache.match_from(leaf, p[prefix:-1]) if matched == prefix else leaf
                      for p in prompts]
        for node in row_leaves:
            self.cache.lock(node)  # nothing on the rows' paths may be evicted from now on
        # each row continues after its own match, or after the prefix the group computes
        sizes = [prefix - matched] + [len(p) - max(node.depth, prefix) + m.params.max_tokens
                                      for p, node, m in zip(prompts, row_leaves, group.members)]
        starts = self._allocate(sizes)
        if starts is None:
            for node in row_leaves:
                self.cache.unlock(node)
            return False
        if prefix > matched:
            row_leaves = self._queue_shared_prefix(leaf, prompts[0][matched:prefix], starts[0],
                                                   row_leaves)
        group.prefix_length = prefix
        for index, (member, row_leaf, start, size) in enumerate(
                zip(group.members, row_leaves, starts[1:], sizes[1:])):
            # served from the cache, or computed once for the group by its first member
            cached = row_leaf.depth - (prefix - matched if index == 0 else 0)
            group.rows.append(self._admit_row(member, group, row_leaf, start, size, cached))
        return True

    def _queue_shared_prefix(self, leaf: Node, tokens: list[int], start: int,
                             row_leaves: list[Node]) -> list[Node]:
        """Queues the job that computes the group's uncached shared prefix into a new node
        below `leaf`; the rows' locks move down to it. Returns the rows' new leaves."""
        job = PrefillJob(tokens, start, leaf.depth, extents(leaf))
        node = job.node = self.cache.add(leaf, tokens, start, job)
        self.cache.lock(node)  # the job's lock, released when it is done
        for _ in row_leaves:
            self.cache.lock(node)
            self.cache.unlock(leaf)
        self.jobs.append(job)
        return [node] * len(row_leaves)

    def _admit_row(self, member: Member, group: Group, leaf: Node, start: int, capacity: int,
                   cached: int) -> Row:
        member.status = Status.PREFILL
        row = Row(member=member, group=group, leaf=leaf,
                  suffix=list(member.prompt_ids[leaf.depth :]), tail_start=start,
                  tail_capacity=capacity, cached_tokens=cached)
        row.job = PrefillJob(row.suffix, start, leaf.depth, extents(leaf), row=row)
        self.jobs.append(row.job)
        self.prefix_cache_queries += len(member.prompt_ids)
        self.prefix_cache_hits += cached
        return row

    def _allocate(self, sizes: list[int]) -> list[int] | None:
        """One extent per size, or None (and nothing taken) if they do not all fit."""
        starts: list[int] = []
        for size in sizes:
            start = self.cache.allocate(size)
            if start is None:
                for taken, taken_size in zip(starts, sizes):
                    self.slots.free(taken, taken_size)
                return None
            starts.append(start)
        return starts

    def _take_chunks(self) -> list[Chunk]:
        """Queued prefill work, in order, up to the step's token budget."""
        chunks, budget = [], self.max_prefill_tokens
        for job in self.jobs:
            if budget <= 0:
                break
            if job.is_dropped:
                continue
            length = min(job.num_left, budget)
            chunks.append(Chunk(job, length))
            budget -= length
        return chunks
