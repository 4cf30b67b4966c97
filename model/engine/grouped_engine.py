"""The step-level engine: the only place where requests become tensors.

`add(group)` queues a group of members (questions whose prompts share a prefix); `step()` runs
one forward pass and returns the token events it produced. Between any two steps new groups
are admitted and finished or aborted rows leave, so no request waits for another's whole
generation. One step:
  1. admit waiting groups, oldest first, while the worst case of the next one (its uncached
     prefix + every member's rest of prompt + max_tokens) fits in the KV pool; a group is
     admitted whole. Its shared prefix (longest common prefix of its prompts) is matched
     against the prefix cache; only the unmatched part is computed, once, into a new node;
  2. take up to `max_prefill_tokens` of queued prefill work (shared prefixes, then each row's
     rest of prompt), in order, and one decode token of every generating row;
  3. run them as one flat batch through the forward pass;
  4. a group whose rows all finished their prompt starts generating: its rows decode in
     lockstep (CSA sees its peers at the same step), and leave one by one.
With CSA off (or untrained) every member gets exactly the tokens that decoding its prompt
alone would give: grouping and caching change the cost, never the content.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import torch

from model.engine.batch import Chunk, Group, PrefillJob, Row, build_step, extents
from model.engine.kv_pool import KVPool, SlotAllocator
from model.engine.prefix_cache import PrefixCache
from model.engine.request import EngineInputError, Member, Status, TokenEvent, Usage
from model.engine.sampling import make_generator, sample_token
from model.engine.text_stream import TextStream
from model.forward.cuda_graphs import DecodeGraphs
from model.forward.decoder import DecoderForward, StepInputs
from model.head.group_head import GroupHead

__all__ = ["EngineInputError", "GroupedEngine", "Member", "TokenEvent", "Usage"]

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MB = {"cpu": 1024, "cuda": 8192}
# prompt tokens per step: on a GPU a step of 512 tokens mostly pays for its launches
DEFAULT_MAX_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
# decode steps of up to this many rows replay a captured CUDA graph (model.forward.cuda_graphs)
DEFAULT_DECODE_GRAPH_ROWS = {"cpu": 0, "cuda": 128}
POOL_CONTEXTS = 16  # a default pool never holds more than this many full contexts


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix, leaving every prompt at least one token of suffix (the last
    prompt token must run per row to produce that row's first logits)."""
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


class GroupedEngine:
    """Not thread-safe: one thread calls `add` and `step`; `Member.abort` is safe from any."""

    def __init__(self, model, tokenizer, csa: GroupHead | None = None, *,
                 kv_cache_mb: float | None = None, max_prefill_tokens: int | None = None,
                 decode_graph_rows: int | None = None):
        """None: the device's default (DEFAULT_*). `decode_graph_rows` 0 turns the decode
        graphs off; on a CPU a positive value runs their padded steps eagerly."""
        self.model = model
        self.tokenizer = tokenizer
        self.csa = csa.to(model.device, model.dtype) if csa is not None else None
        self.forward = DecoderForward(model)
        self.lm_head = model.get_output_embeddings()
        self.max_context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer))
        if max_prefill_tokens is None:
            max_prefill_tokens = _per_device(DEFAULT_MAX_PREFILL_TOKENS, self.device)
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = self._make_pool(kv_cache_mb)
        self.graphs = self._make_graphs(decode_graph_rows)
        self.cache = PrefixCache(self.pool.slots)
        self._waiting: deque[Group] = deque()
        self._running: list[Group] = []
        self._jobs: deque[PrefillJob] = deque()
        self.prefix_cache_queries = 0  # prompt tokens looked up in the cache (as vLLM)
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    def _make_pool(self, kv_cache_mb: float | None) -> KVPool:
        shape, dtype = self.forward.pool_shape, self.model.dtype
        if kv_cache_mb is not None:
            return KVPool.with_megabytes(shape, kv_cache_mb, dtype, self.device)
        megabytes = _per_device(DEFAULT_KV_CACHE_MB, self.device)
        capacity = int(megabytes * 2**20) // shape.bytes_per_token(dtype)
        return KVPool(shape, min(capacity, POOL_CONTEXTS * self.max_context), dtype, self.device)

    def _make_graphs(self, max_rows: int | None) -> DecodeGraphs | None:
        if max_rows is None:
            max_rows = _per_device(DEFAULT_DECODE_GRAPH_ROWS, self.device)
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
    def has_work(self) -> bool:
        return bool(self._waiting) or not all(_is_done(g) for g in self._running)

    @property
    def kv_cache_usage(self) -> float:
        """Share of the pool held by running sequences (cached, evictable prefixes excluded)."""
        idle = self.pool.slots.num_free + self.cache.evictable_tokens()
        return 1.0 - idle / self.pool.capacity

    # --- what callers may ask ------------------------------------------------------------

    def check_member(self, member: Member) -> None:
        """Raises EngineInputError for a member that cannot be served as asked."""
        if not member.prompt_ids:
            raise EngineInputError("the prompt is empty", "messages")
        problems = member.params.problems()
        if problems:
            field, reason = problems[0]
            raise EngineInputError(f"{field}: {reason}", field)
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

    def worst_case_tokens(self, members: Sequence[Member]) -> int:
        """KV slots a group may need at most: its shared prefix once, each member's rest."""
        prefix = shared_prefix_length([m.prompt_ids for m in members])
        return prefix + sum(len(m.prompt_ids) - prefix + m.params.max_tokens for m in members)

    def check_group(self, members: Sequence[Member]) -> None:
        if not members:
            raise EngineInputError("a group has no members")
        for member in members:
            self.check_member(member)
        needed = self.worst_case_tokens(members)
        if needed > self.pool.capacity:
            raise EngineInputError(
                f"this request may need {needed} tokens of KV cache (every prompt and its "
                f"max_tokens), more than the server's whole KV cache of {self.pool.capacity} "
                "tokens (--kv-cache-mb); send fewer questions or a smaller max_tokens",
                "max_tokens")

    def add(self, members: Sequence[Member], uses_trained_head: bool = True) -> None:
        """Queues one group; `uses_trained_head`: CSA and the LM-head adapter apply to it."""
        self.check_group(members)
        for member in members:
            member.status = Status.WAITING
        self._waiting.append(Group(list(members), uses_trained_head))

    def generate(self, groups: Sequence[Sequence[Member]]) -> Iterator[TokenEvent]:
        """Runs `groups` (and whatever else was added) until they all finish."""
        for group in groups:
            self.check_group(group)
        for group in groups:
            self.add(group)
        while self.has_work:
            events = self.step()
            if not events and not self._jobs and not any(self._decode_rows()):
                raise RuntimeError("the engine has waiting groups but cannot admit any")
            yield from events

    # --- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events = self._drop_aborted()
        self._running = [g for g in self._running if not _is_done(g)]
        self._admit()
        decode_rows = self._decode_rows()
        chunks = self._take_chunks()
        if not decode_rows and not chunks:
            return events
        inputs, decode_rows = build_step(decode_rows, chunks, self.forward.scale)
        hidden = self.run_forward(inputs)
        ready = list(zip(decode_rows, hidden[: len(decode_rows)]))
        for row in decode_rows:
            row.num_fed += 1
        finished_prompts = iter(hidden[len(decode_rows) :])
        for chunk in chunks:
            job = chunk.job
            job.num_done += chunk.length
            if job.row is not None:
                job.row.num_fed += chunk.length
                if job.is_done:
                    job.row.hidden = next(finished_prompts)
            elif job.is_done:
                self.cache.unlock(job.node)
        self._jobs = deque(j for j in self._jobs if not (j.is_done or _is_dropped(j)))
        ready += self._starting_rows()
        return events + self._sample(ready)

    def run_forward(self, inputs: StepInputs) -> torch.Tensor:
        """One step's forward (host-side inputs): replayed from a graph when it can be."""
        if self.graphs is not None and self.graphs.fits(inputs):
            return self.graphs.run(inputs)
        return self.forward(inputs.to(self.device), self.pool.kv)

    def _admit(self) -> None:
        while self._waiting and self._try_admit(self._waiting[0]):
            self._running.append(self._waiting.popleft())

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
            tokens = prompts[0][matched:prefix]
            job = PrefillJob(tokens, starts[0], matched, extents(leaf))
            node = job.node = self.cache.add(leaf, tokens, starts[0], job)
            self.cache.lock(node)  # the job's lock, released when it is done
            for _ in row_leaves:
                self.cache.lock(node)  # the rows' locks move down to the new node
                self.cache.unlock(leaf)
            row_leaves = [node] * len(row_leaves)
            self._jobs.append(job)
        group.prefix_length = prefix
        for index, (member, row_leaf, start, size) in enumerate(
                zip(group.members, row_leaves, starts[1:], sizes[1:])):
            # served from the cache, or computed once for the group by its first member
            cached = row_leaf.depth - (prefix - matched if index == 0 else 0)
            row = self._make_row(member, group, row_leaf, start, size, cached)
            row.job = PrefillJob(row.suffix, start, row_leaf.depth, extents(row_leaf), row=row)
            self._jobs.append(row.job)
            group.rows.append(row)
            self.prefix_cache_queries += len(member.prompt_ids)
            self.prefix_cache_hits += cached
        return True

    def _allocate(self, sizes: list[int]) -> list[int] | None:
        """One extent per size, or None (and nothing taken) if they do not all fit."""
        starts: list[int] = []
        for size in sizes:
            start = self.cache.allocate(size)
            if start is None:
                for taken, taken_size in zip(starts, sizes):
                    self.pool.slots.free(taken, taken_size)
                return None
            starts.append(start)
        return starts

    def _make_row(self, member: Member, group: Group, leaf, start: int, capacity: int,
                  cached: int) -> Row:
        member.status = Status.PREFILL
        return Row(
            member=member, group=group, leaf=leaf, suffix=list(member.prompt_ids[leaf.depth :]),
            tail_start=start, tail_capacity=capacity, cached_tokens=cached,
            stream=TextStream(self.tokenizer, member.params.stop),
            generator=make_generator(member.params, self.device),
            stop_token_ids=(frozenset() if member.params.ignore_eos else self.eos_token_ids)
            | set(member.params.stop_token_ids),
        )

    def _decode_rows(self) -> list[Row]:
        return [r for g in self._running for r in g.rows if r.output_ids and not r.is_finished]

    def _take_chunks(self) -> list[Chunk]:
        """Queued prefill work, in order, up to the step's token budget."""
        chunks, budget = [], self.max_prefill_tokens
        for job in self._jobs:
            if budget <= 0:
                break
            if _is_dropped(job):
                continue
            length = min(job.num_left, budget)
            chunks.append(Chunk(job, length))
            budget -= length
        return chunks

    def _starting_rows(self) -> list[tuple[Row, torch.Tensor]]:
        """Rows of groups whose every prompt is now computed: they get their first token."""
        starting = []
        for group in self._running:
            rows = [r for r in group.rows if not r.is_finished]
            if rows and all(r.hidden is not None for r in rows):
                for row in rows:
                    starting.append((row, row.hidden))
                    row.hidden = None
                    row.member.status = Status.DECODE
        return starting

    # --- tokens out ------------------------------------------------------------------------

    def _sample(self, ready: list[tuple[Row, torch.Tensor]]) -> list[TokenEvent]:
        if not ready:
            return []
        rows = [row for row, _ in ready]
        logits = self._logits(rows, torch.stack([h for _, h in ready]))
        greedy = logits.argmax(dim=-1).tolist()
        events = []
        for index, row in enumerate(rows):
            params = row.member.params
            try:
                token = (greedy[index] if params.is_greedy
                         else sample_token(logits[index], params, row.generator))
                events.append(self._advance(row, token))
            except Exception as exc:  # noqa: BLE001 - one member's failure ends that member only
                events.append(self._finish(row, None, "", "error",
                                           f"{type(exc).__name__}: {exc}"))
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

    def _advance(self, row: Row, token: int) -> TokenEvent:
        """Appends `token` to `row` and decides whether the row has finished."""
        row.output_ids.append(token)
        if token in row.stop_token_ids:
            return self._finish(row, token, row.stream.flush(), "stop")
        text = row.stream.add(token)
        if row.stream.is_stopped:
            return self._finish(row, token, text, "stop")
        if len(row.output_ids) >= row.member.params.max_tokens:
            return self._finish(row, token, text + row.stream.flush(), "length")
        return TokenEvent(row.member, token, text)

    def _finish(self, row: Row, token: int | None, text: str, reason: str,
                error: str | None = None) -> TokenEvent:
        """Ends a row: what it computed stays in the prefix cache, the rest of its extent is
        freed, and its path may be evicted once no one else uses it."""
        row.is_finished = True
        row.member.status = Status.FINISHED
        computed = row.own_tokens[: row.num_fed]
        self.cache.insert(row.leaf, computed, row.tail_start)
        self.pool.slots.free(row.tail_start + row.num_fed, row.tail_capacity - row.num_fed)
        self.cache.unlock(row.leaf)
        usage = Usage(len(row.member.prompt_ids), row.cached_tokens, len(row.output_ids))
        return TokenEvent(row.member, token, text, reason, usage, error)

    def _drop_aborted(self) -> list[TokenEvent]:
        events = []
        for group in self._running:
            for row in group.rows:
                if not row.is_finished and row.member.is_aborted:
                    events.append(self._finish(row, None, "", "abort"))
        for group in list(self._waiting):
            aborted = [m for m in group.members if m.is_aborted]
            for member in aborted:
                member.status = Status.FINISHED
                usage = Usage(len(member.prompt_ids), 0, 0)
                events.append(TokenEvent(member, None, "", "abort", usage))
            group.members = [m for m in group.members if not m.is_aborted]
            if not group.members:
                self._waiting.remove(group)
        return events

    def reset(self) -> list[Member]:
        """Forgets everything (after a failed step): the pool is empty again. Returns the
        members that were waiting or running, for the caller to fail."""
        members = [m for g in self._waiting for m in g.members]
        members += [r.member for g in self._running for r in g.rows if not r.is_finished]
        for member in members:
            member.status = Status.FINISHED
        self.pool.slots = SlotAllocator(self.pool.capacity)
        self.cache = PrefixCache(self.pool.slots)
        self._waiting, self._running, self._jobs = deque(), [], deque()
        return members

    def abort_all(self) -> Iterable[TokenEvent]:
        """Ends everything (shutdown)."""
        for group in [*self._waiting, *self._running]:
            for member in group.members:
                member.abort()
        return self._drop_aborted()


def _is_dropped(job: PrefillJob) -> bool:
    return job.row is not None and job.row.is_finished


def _is_done(group: Group) -> bool:
    return all(r.is_finished for r in group.rows)


def _per_device(defaults: dict[str, int], device: torch.device) -> int:
    """The device type's default; a CPU's for other devices."""
    return defaults.get(device.type, defaults["cpu"])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids
