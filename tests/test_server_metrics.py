"""/metrics: every contract name exposed, counters that agree with the usage the API returned,
and grouping made visible: 10 concurrent chat requests with one group_id run as one group."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = ["e2e_request_latency_seconds", "time_to_first_token_seconds",
              "request_queue_time_seconds", "time_per_output_token_seconds", "group_size",
              "group_wait_seconds"]
COUNTERS = ["prompt_tokens", "prompt_tokens_computed", "generation_tokens", "request_success",
            "requests", "prefix_cache_queries", "prefix_cache_hits", "decode_row_steps",
            "decode_tokens", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens"]
GAUGES = ["num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"]
PASSAGE = "Water boils at one hundred degrees Celsius at sea level. " * 2


def scrape(server) -> dict[str, float]:
    """sample name + sorted labels -> value, parsed from the Prometheus text format."""
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return samples.get(f"groupwise:{name}{{{key}}}", 0.0)


def ask(client, question: str, **extra):
    return client.chat.completions.create(
        model="tiny-random", max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": PASSAGE}, {"role": "user", "content": question}],
        **extra)


def test_contract_names_are_exposed(start_server):
    server = start_server()
    httpx.post(f"{server.v1}/chat/completions", timeout=30,
               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    samples = scrape(server)
    names = {key.split("{")[0] for key in samples}
    for name in HISTOGRAMS:
        assert {f"groupwise:{name}_bucket", f"groupwise:{name}_sum",
                f"groupwise:{name}_count"} <= names
    assert {f"groupwise:{name}_total" for name in COUNTERS} <= names
    assert {f"groupwise:{name}" for name in GAUGES} <= names


def test_counters_agree_with_the_returned_usage(start_server):
    server = start_server()
    chat = httpx.post(f"{server.v1}/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    grouped = httpx.post(f"{server.v1}/grouped_completions", timeout=30,
                         json={"context": PASSAGE, "questions": ["a?", "b?"], "max_tokens": 3})
    bad = httpx.post(f"{server.v1}/chat/completions", json={"messages": []})
    usages = [chat.json()["usage"], grouped.json()["usage"]]
    samples = scrape(server)
    assert value(samples, "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(samples, "prompt_tokens_computed_total") == sum(
        u["computed_prompt_tokens"] for u in usages)
    assert value(samples, "prompt_tokens_computed_total") < value(samples, "prompt_tokens_total")
    assert value(samples, "generation_tokens_total") == sum(
        u["completion_tokens"] for u in usages)
    reasons = [chat.json()["choices"][0]["finish_reason"],
               *(a["finish_reason"] for a in grouped.json()["answers"])]
    for reason in set(reasons):
        assert value(samples, "request_success_total", finish_reason=reason) == reasons.count(
            reason)
    assert value(samples, "requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(samples, "requests_total", route="/v1/chat/completions", status="400") == 1
    assert value(samples, "requests_total", route="/v1/grouped_completions", status="200") == 1
    assert bad.status_code == 400
    assert value(samples, "e2e_request_latency_seconds_count") == 3
    assert value(samples, "time_to_first_token_seconds_count") == 3
    assert value(samples, "request_queue_time_seconds_count") == 3
    assert value(samples, "num_requests_waiting") == value(samples, "num_requests_running") == 0
    # each answer's first token comes from its prompt's last position, the rest from decode
    # steps, which write one token each plus the proposed tokens they accept
    decoded = value(samples, "decode_tokens_total")
    assert decoded == value(samples, "generation_tokens_total") - 3
    assert decoded == value(samples, "decode_row_steps_total") + value(
        samples, "spec_decode_num_accepted_tokens_total")
    assert value(samples, "spec_decode_num_accepted_tokens_total") <= value(
        samples, "spec_decode_num_draft_tokens_total")


def test_with_speculation_off_a_decode_step_writes_one_token(start_server):
    server = start_server(speculate="off")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    reply = ask(client, "Does it boil? Does it boil? Does it boil?")
    samples = scrape(server)
    assert value(samples, "decode_tokens_total") == reply.usage.completion_tokens - 1
    assert value(samples, "decode_row_steps_total") == value(samples, "decode_tokens_total")
    assert value(samples, "spec_decode_num_drafts_total") == 0


def test_ten_concurrent_requests_with_one_group_id_are_one_group(start_server):
    # the group starts when its 10th member arrives; the long wait only guards slow machines
    server = start_server(max_group_size=10, max_wait_ms=60000)
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(
            lambda i: ask(client, f"Question {i}?", extra_body={"group_id": "water"}),
            range(10)))
    samples = scrape(server)
    assert value(samples, "group_size_count") == 1 and value(samples, "group_size_sum") == 10
    assert value(samples, "group_size_bucket", le="10.0") == 1
    assert value(samples, "group_size_bucket", le="8.0") == 0
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert len({r.usage.prompt_tokens for r in replies}) == 1  # tokenized alike, in parallel
    assert cached[0] == 0 and all(c > len(PASSAGE) for c in cached[1:])  # one paid the prefix


def test_header_hint_groups_like_the_body_field(start_server):
    server = start_server(max_group_size=3, max_wait_ms=60000)
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: ask(client, f"Q{i}", extra_headers={"X-Group-Id": "h"}),
                      range(3)))
    samples = scrape(server)
    assert value(samples, "group_size_count") == 1 and value(samples, "group_size_sum") == 3


def test_requests_without_a_hint_run_at_once_and_share_the_passage_through_the_cache(
        start_server):
    server = start_server(max_group_size=2, max_wait_ms=60000)
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda q: ask(client, q), ["First?", "Second?"]))
    samples = scrape(server)  # no 60 s wait happened: a group of one is ready at once
    assert value(samples, "group_size_count") == 2 and value(samples, "group_size_sum") == 2
    assert max(r.usage.prompt_tokens_details.cached_tokens for r in replies) > len(PASSAGE)
    assert value(samples, "prefix_cache_queries_total") == sum(
        r.usage.prompt_tokens for r in replies)
    assert value(samples, "prefix_cache_hits_total") == sum(
        r.usage.prompt_tokens_details.cached_tokens for r in replies)
