"""When a decoding row verifies proposed tokens (`model.engine.proposer`), and how many: a proposal
pays only when the tokens it is expected to add are worth the time they add to the step.

A step's time is modelled as fixed + per_token * tokens, fitted to the decode steps the engine runs
(exponentially weighted least squares; until the steps vary enough to show the slope, a token
costs the device's default share of the fixed part). A decode step is bound by reading the
weights when it has few tokens (a GPU below hundreds of rows): there the fixed part dominates
and checking a few more tokens in the same pass costs little. With many rows on a CPU the step
is bound by arithmetic, every token costs about the same, and a proposal that is often wrong
costs more than it saves: then the model holds proposals back.

A proposal's k-th token is written only if all before it were. How likely that is was seen
in the proposals verified so far, for each length of the match they came from (a row's last
3 tokens found again are a surer guide than its last one) and each k: the chance that token k
is accepted once token k - 1 was (until k was reached often, token k - 1's chance). A token's
expected worth is the product of those chances up to it. Tokens are added to proposals, the
likeliest first, while each adds more expected tokens per second than the step's current
throughput, with a margin. Torch-free: tested with numbers alone.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from model.engine.groups import Row
from model.engine.options import MAX_PROPOSAL_TOKENS, TOKEN_SHARE
from model.engine.proposer import NgramIndex, propose

MAX_NGRAM = 4  # the longest run of a row's last tokens looked up
RECENT_ANSWERS = 8  # finished answers of a scope kept as proposal sources
RECENT_SCOPES = 64  # scopes (tenant and cache salt) that keep them, the least recent dropped
PRIOR_RATE = 0.5  # a token's chance of acceptance before any was verified
PRIOR_WEIGHT = 4.0  # proposed tokens the prior counts as
DECAY = 0.98  # weight of the past in the step-time fit, per step
PRIOR_SPREAD = 8.0  # tokens either side of the steps' mean where the prior steps lie
PRIOR_STEP_WEIGHT = 0.5  # each prior step's weight (an observed step weighs 1, then fades)
# a token is verified only when it is expected to return this much more than it costs: the
# fit's line is an average, and a token at the margin gains next to nothing
PAYBACK = 1.2


@dataclass(frozen=True)
class SpeculationOptions:
    enabled: bool = True
    max_tokens: int = MAX_PROPOSAL_TOKENS  # the longest proposal
    token_share: float = TOKEN_SHARE["cpu"]  # what a token adds to a step, of its fixed part


NO_SPECULATION = SpeculationOptions(enabled=False)


class StepCost:
    """A step's wall time as fixed + per_token * tokens, fitted by exponentially weighted least
    squares to the steps observed (about the last 50 weigh). Beside them, two prior steps on the
    line through their mean whose slope is `token_share` of its fixed part, 8 tokens either side
    of it: they leave the level to the steps, keep the slope defined while every step has the
    same number of tokens, and weigh little once the steps vary."""

    def __init__(self, token_share: float, fixed: float = 0.010):
        self.token_share = token_share
        self._fixed = fixed  # until a step is observed
        self._seen = [0.0] * 5  # sums of weight, w t, w s, w t^2, w t s

    def observe(self, tokens: int, seconds: float) -> None:
        self._seen = _add([DECAY * total for total in self._seen], tokens, seconds)

    @property
    def line(self) -> tuple[float, float]:
        """(fixed, per_token) seconds, both positive."""
        if self._seen[0] == 0:
            return self._fixed, self._fixed * self.token_share
        mean_t, mean_s = self._seen[1] / self._seen[0], self._seen[2] / self._seen[0]
        slope = self.token_share * mean_s / (1 + self.token_share * mean_t)
        sums = self._seen
        for offset in (-PRIOR_SPREAD, PRIOR_SPREAD):
            sums = _add(sums, mean_t + offset, mean_s + slope * offset, PRIOR_STEP_WEIGHT)
        weight, t, s, tt, ts = sums
        per_token = max((weight * ts - t * s) / (weight * tt - t * t), 1e-9)
        return max((s - per_token * t) / weight, 1e-9), per_token


class Speculation:
    """The scheduler's speculation policy: what each decoding row verifies in a step."""

    def __init__(self, options: SpeculationOptions):
        self.options = options
        self.cost = StepCost(options.token_share)
        # per match length n and position k (from 0): proposals that reached the k-th token
        # (all before it accepted), and of those, the ones that accepted it
        shape = (MAX_NGRAM + 1, options.max_tokens)
        self._reached = [[0] * shape[1] for _ in range(shape[0])]
        self._accepted = [[0] * shape[1] for _ in range(shape[0])]
        self._matches: dict[Row, int] = {}  # the match length of each proposal in flight
        self._recent: OrderedDict[Hashable, deque[NgramIndex]] = OrderedDict()

    def proposals(self, rows: Sequence[Row], num_rows: int) -> dict[Row, list[int]]:
        """What each of `rows` (decoding, free to speculate) verifies, in a decode step of
        `num_rows` rows (`rows` among them), each with its last token."""
        if not self.options.enabled:
            return {}
        candidates: dict[Row, tuple[int, list[int]]] = {}
        for row in rows:
            room = row.member.params.max_tokens - len(row.output_ids) - 1  # never past it
            limit = min(self.options.max_tokens, room)
            if limit > 0:
                sources = [*map(_lookup, _siblings(row)),
                           *self._recent.get(row.group.namespace, ())]
                n, found = propose(_lookup(row), sources, limit)
                if found:
                    candidates[row] = n, found
        chosen = self._worthwhile(candidates, num_rows)
        self._matches = {row: candidates[row][0] for row in chosen}
        return chosen

    def chance(self, match: int, k: int) -> float:
        """The chance that a proposal's k-th token (from 0) from a match of length `match` is
        accepted, once every token before it was. Before a position was reached often, the
        position before it is the guide (acceptance runs on once a proposal is on track)."""
        chance = PRIOR_RATE
        for position in range(k + 1):
            chance = ((self._accepted[match][position] + chance * PRIOR_WEIGHT)
                      / (self._reached[match][position] + PRIOR_WEIGHT))
        return chance

    def _worthwhile(self, candidates: dict[Row, tuple[int, list[int]]],
                    num_rows: int) -> dict[Row, list[int]]:
        """The proposals cut to the tokens worth their cost."""
        fixed, per_token = self.cost.line
        seconds, worth = fixed + per_token * num_rows, float(num_rows)
        lengths = dict.fromkeys(candidates, 0)
        # the next token of each proposal, the likeliest first: (-its worth, order, row)
        heap = [(-self.chance(match, 0), order, row)
                for order, (row, (match, _)) in enumerate(candidates.items())]
        heapq.heapify(heap)
        while heap:
            value, order, row = heapq.heappop(heap)
            if -value * seconds < PAYBACK * worth * per_token:
                break  # worth less than it costs the step: so is every token after it
            lengths[row] += 1
            seconds, worth = seconds + per_token, worth - value
            match, tokens = candidates[row]
            if lengths[row] < len(tokens):
                heapq.heappush(heap, (value * self.chance(match, lengths[row]), order, row))
        return {row: candidates[row][1][:n] for row, n in lengths.items() if n}

    def remember(self, row: Row) -> None:
        """A finished row's answer, a source for the later rows of its scope: its tenant and
        cache salt, never another's (what a proposal finds shows in how fast a row writes)."""
        if not self.options.enabled or not row.output_ids:
            return
        scope = row.group.namespace
        recent = self._recent.pop(scope, None) or deque(maxlen=RECENT_ANSWERS)
        recent.appendleft(NgramIndex(MAX_NGRAM, row.output_ids))
        self._recent[scope] = recent
        while len(self._recent) > RECENT_SCOPES:
            self._recent.popitem(last=False)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe(num_tokens, seconds)

    def observe_verified(self, row: Row, proposed: int, accepted: int) -> None:
        """`row` agreed with the first `accepted` of its `proposed` tokens."""
        match = self._matches.pop(row)
        for k in range(min(accepted + 1, proposed)):
            self._reached[match][k] += 1
            self._accepted[match][k] += k < accepted


def _add(sums: list[float], tokens: float, seconds: float, weight: float = 1.0) -> list[float]:
    values = (1.0, tokens, seconds, tokens * tokens, tokens * seconds)
    return [total + weight * value for total, value in zip(sums, values)]


def _lookup(row: Row) -> NgramIndex:
    """The row's index of its prompt and output, built the first time it is asked."""
    if row.lookup is None:
        row.lookup = NgramIndex(MAX_NGRAM, [*row.member.prompt_ids, *row.output_ids])
    return row.lookup


def _siblings(row: Row) -> list[Row]:
    """The other rows of its group that have written something."""
    return [other for other in row.group.rows if other is not row and other.output_ids]
