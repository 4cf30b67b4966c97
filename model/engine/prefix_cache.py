"""The persistent prefix cache: a radix tree over token ids whose nodes own extents of the pool.

Each node holds a run of tokens (the edge from its parent) and the pool slots of their keys and
values, contiguous: slot `start + i` holds token i of the node. A path from a root spells a
prompt prefix whose KV is in the pool. Trees are kept per namespace (tenant + cache salt), so a
prompt never matches another tenant's tokens: a shared prefix would be a side channel, since
`cached_tokens` tells a client how much of its prompt someone else had sent.

A node may be *pending*: its KV is still being prefilled by a `job`. Pending nodes can be
matched, because the engine runs prefill jobs in order: whoever matches a pending node queues
its own work after the job that fills it. A job holds a lock on its node until it is done, so
a pending node is never evicted and its slots are never handed out twice.

`refs` counts the running groups whose path goes through a node (locking a node locks its
ancestors). Unreferenced, computed leaves are evicted least recently used first when the pool
needs room. (The structure follows mini-sglang's radix cache; the contiguous extents are what
lets attention read a node with no gather on a CPU.)
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from model.engine.slots import SlotAllocator

_serials = itertools.count()


class Job(Protocol):
    """Something that fills pending nodes; `is_done` once their KV is in the pool."""

    @property
    def is_done(self) -> bool: ...


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    start: int  # pool slot of tokens[0]
    parent: Node | None
    depth: int  # tokens from the root to the end of this node
    job: Job | None = None  # set while pending
    children: dict[int, Node] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def is_ready(self) -> bool:
        return self.job is None or self.job.is_done

    @property
    def extent(self) -> tuple[int, int]:
        return self.start, len(self.tokens)

    def path(self) -> list[Node]:
        """The nodes from the root's first child down to this one (the root holds no tokens)."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


class PrefixCache:
    def __init__(self, slots: SlotAllocator):
        self.slots = slots
        self._roots: dict[Hashable, Node] = {}
        self._clock = itertools.count(1)
        self.num_cached_tokens = 0  # tokens held by nodes, referenced or not

    def root(self, namespace: Hashable) -> Node:
        if namespace not in self._roots:
            self._roots[namespace] = Node((), 0, None, 0)
        return self._roots[namespace]

    def match(self, namespace: Hashable, tokens: Sequence[int], limit: int) -> Node:
        """The deepest node whose path spells a prefix of tokens[:limit]; a node matched only
        in part is split so that the match ends on a node boundary."""
        return self.match_from(self.root(namespace), tokens[:limit])

    def add(self, parent: Node, tokens: Sequence[int], start: int, job: Job | None) -> Node:
        """A new child of `parent` for `tokens`, whose KV is (or will be, by `job`) at
        `start`. The caller has matched first, so no child begins with tokens[0]."""
        assert tokens and tokens[0] not in parent.children
        node = Node(tuple(tokens), start, parent, parent.depth + len(tokens), job,
                    last_used=next(self._clock))
        parent.children[node.tokens[0]] = node
        self.num_cached_tokens += len(tokens)
        return node

    def insert(self, parent: Node, tokens: Sequence[int], start: int) -> None:
        """Keeps computed KV of `tokens` (a continuation of `parent`'s path, at slots from
        `start`) in the tree. The part the tree already holds is a duplicate: its slots are
        freed. The caller gives up the slots either way."""
        node = self.match_from(parent, tokens)
        known = node.depth - parent.depth
        self.slots.free(start, known)
        if known < len(tokens):
            self.add(node, tokens[known:], start + known, None)

    def match_from(self, parent: Node, tokens: Sequence[int]) -> Node:
        """`match` below `parent`, for tokens that continue its path."""
        node, matched = parent, 0
        now = next(self._clock)
        while matched < len(tokens) and (child := node.children.get(tokens[matched])):
            length = _common_length(child.tokens, tokens, matched)
            if length < len(child.tokens):
                child = self._split(child, length)
            child.last_used = now
            node, matched = child, matched + length
        return node

    def lock(self, node: Node) -> None:
        while node.parent is not None:
            node.refs += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node.parent is not None:
            node.refs -= 1
            assert node.refs >= 0
            node = node.parent

    def allocate(self, length: int) -> int | None:
        """A run of `length` slots, evicting least recently used leaves until one is free."""
        while (start := self.slots.allocate(length)) is None:
            if not self._evict_one():
                return None
        return start

    def evictable_tokens(self) -> int:
        return sum(len(n.tokens) for n in self._nodes() if n.refs == 0 and n.is_ready)

    def clear(self) -> None:
        """Drops every unreferenced node (all of them when nothing runs)."""
        while self._evict_one():
            pass

    def _evict_one(self) -> bool:
        leaves = [n for n in self._nodes() if not n.children and n.refs == 0 and n.is_ready]
        if not leaves:
            return False
        self._remove(min(leaves, key=lambda n: n.last_used))
        return True

    def _remove(self, node: Node) -> None:
        assert node.parent is not None, "a root is never removed"
        del node.parent.children[node.tokens[0]]
        self.slots.free(node.start, len(node.tokens))
        self.num_cached_tokens -= len(node.tokens)

    def _split(self, node: Node, length: int) -> Node:
        """Cuts `node` after `length` tokens; returns the new upper part. The node object keeps
        the lower part, so whoever holds it (a running group's leaf) still holds the deepest
        node of its path."""
        parent = node.parent
        assert parent is not None, "a root is never split"
        upper = Node(node.tokens[:length], node.start, parent, parent.depth + length, node.job,
                     refs=node.refs, last_used=node.last_used)
        parent.children[upper.tokens[0]] = upper
        node.tokens, node.start, node.parent = node.tokens[length:], node.start + length, upper
        upper.children[node.tokens[0]] = node
        return upper

    def _nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.parent is not None:
                yield node


def _common_length(edge: tuple[int, ...], tokens: Sequence[int], offset: int) -> int:
    length, most = 0, min(len(edge), len(tokens) - offset)
    while length < most and edge[length] == tokens[offset + length]:
        length += 1
    return length
