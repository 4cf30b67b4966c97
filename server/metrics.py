"""Prometheus metrics, named after vLLM's (`vllm:` -> `groupwise:`) so dashboards translate.

Each app owns its registry, so several apps can live in one process (the tests build many).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from model.engine.interface import EngineCounters
from server.dispatcher import Dispatcher
from server.question import Question

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GROUP_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
GROUP_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.e2e_latency = Histogram(
            "groupwise:e2e_request_latency_seconds", "Arrival to last token, per question.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "groupwise:time_to_first_token_seconds", "Arrival to first token, per question.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "groupwise:request_queue_time_seconds", "Arrival to the start of its batch.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "groupwise:time_per_output_token_seconds", "Mean time between tokens after the first.",
            buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.group_size = Histogram(
            "groupwise:group_size", "Questions in a group when it starts running.",
            buckets=GROUP_SIZE_BUCKETS, registry=r)
        self.group_wait = Histogram(
            "groupwise:group_wait_seconds", "First member's arrival to the group's start.",
            buckets=GROUP_WAIT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "groupwise:prompt_tokens", "Prompt tokens billed (each prompt in full).", registry=r)
        self.prompt_tokens_computed = Counter(
            "groupwise:prompt_tokens_computed",
            "Prompt tokens really computed (shared prefixes once per group).", registry=r)
        self.generation_tokens = Counter(
            "groupwise:generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(
            "groupwise:request_success", "Finished questions by finish reason.",
            ["finish_reason"], registry=r)
        self.requests = Counter(
            "groupwise:requests", "HTTP requests by route and status code.",
            ["route", "status"], registry=r)
        self.num_requests_waiting = Gauge(
            "groupwise:num_requests_waiting", "Questions waiting in the queue.", registry=r)
        self.num_requests_running = Gauge(
            "groupwise:num_requests_running", "Questions in the batch on the engine.", registry=r)
        self.kv_cache_usage = Gauge(
            "groupwise:kv_cache_usage_perc",
            "Share of the KV pool held by running requests (1 = full; cached prefixes that "
            "can be evicted do not count).", registry=r)
        self.prefix_cache_queries = Counter(
            "groupwise:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            registry=r)
        self.prefix_cache_hits = Counter(
            "groupwise:prefix_cache_hits",
            "Prompt tokens served from the prefix cache or a group's shared prefix.", registry=r)
        self.decode_row_steps = Counter(
            "groupwise:decode_row_steps",
            "Decode steps of a request (one row in one engine step).", registry=r)
        self.decode_tokens = Counter(
            "groupwise:decode_tokens",
            "Tokens those steps wrote: over decode_row_steps, the tokens per row-step "
            "(above 1 with speculation).", registry=r)
        self.spec_decode_num_drafts = Counter(
            "groupwise:spec_decode_num_drafts", "Proposals verified (speculative decoding).",
            registry=r)
        self.spec_decode_num_draft_tokens = Counter(
            "groupwise:spec_decode_num_draft_tokens", "Tokens proposed in them.", registry=r)
        self.spec_decode_num_accepted_tokens = Counter(
            "groupwise:spec_decode_num_accepted_tokens", "Proposed tokens accepted.", registry=r)
        # each counter that mirrors one of the engine's cumulative counts, and that count
        self._engine_counters = {
            self.prefix_cache_queries: "prefix_cache_queries",
            self.prefix_cache_hits: "prefix_cache_hits",
            self.decode_row_steps: "num_row_steps",
            self.decode_tokens: "num_decode_tokens",
            self.spec_decode_num_drafts: "num_drafts",
            self.spec_decode_num_draft_tokens: "num_draft_tokens",
            self.spec_decode_num_accepted_tokens: "num_accepted_tokens",
        }
        self._engine_counts = dict.fromkeys(self._engine_counters.values(), 0)  # seen so far

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track_queue(self, dispatcher: Dispatcher) -> None:
        """The waiting / running gauges read the dispatcher when scraped."""
        self.num_requests_waiting.set_function(lambda: dispatcher.num_waiting)
        self.num_requests_running.set_function(
            lambda: dispatcher.num_in_flight - dispatcher.num_waiting)

    def observe_engine(self, counters: EngineCounters) -> None:
        """After an engine step (in the worker thread): pool usage, and the engine's counts
        since the last step."""
        self.kv_cache_usage.set(counters.kv_cache_usage)
        for counter, name in self._engine_counters.items():
            count = getattr(counters, name)
            counter.inc(count - self._engine_counts[name])
            self._engine_counts[name] = count

    def observe_group(self, group: list[Question], started_at: float) -> None:
        self.group_size.observe(len(group))
        self.group_wait.observe(started_at - min(q.arrived_at for q in group))
        for question in group:
            self.queue_time.observe(started_at - question.arrived_at)

    def observe_first_token(self, question: Question) -> None:
        assert question.first_token_at is not None, "observed once it is stamped"
        self.time_to_first_token.observe(question.first_token_at - question.arrived_at)

    def observe_finished(self, question: Question) -> None:
        self.request_success.labels(finish_reason=question.finish_reason).inc()
        usage, finished_at = question.usage, question.finished_at
        assert finished_at is not None, "observed once it is stamped"
        if question.scheduled_at is None or usage is None:  # never ran: nothing was computed
            return
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.prompt_tokens_computed.inc(usage.computed_prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        if question.finish_reason in ("stop", "length"):
            self.e2e_latency.observe(finished_at - question.arrived_at)
            if usage.completion_tokens > 1 and question.first_token_at is not None:
                decode_time = finished_at - question.first_token_at
                self.time_per_output_token.observe(decode_time / (usage.completion_tokens - 1))

    def count_http(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
