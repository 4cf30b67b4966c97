"""The shipped scale-out and monitoring configuration against real processes on this machine:
two `python -m server --model tiny-random` replicas behind the shipped front door (a real nginx
running deploy/nginx/nginx.conf) and the real cache-aware router (vllm-router, run by the
shipped deploy/router/start.sh); only where things listen and where the replicas are is written
for the test. And the metric names the Prometheus rules and the Grafana dashboard use, checked
against /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.scale import SYSTEM_PROMPT_FILE, router_command, router_env
from tests.test_deploy_config import DASHBOARD, DEPLOY, ROOT, require_tool

pytestmark = pytest.mark.slow

NGINX_DIR = DEPLOY / "nginx"
REPLICA_NAMES = ("replica-a", "replica-b")
NUM_GROUPS = 12
# A group of GROUP_SIZE is ready at once; a partial one waits MAX_WAIT_MS for more members,
# long enough for concurrent questions to meet even on a busy machine.
GROUP_SIZE, MAX_WAIT_MS = 4, 100
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time, not by the server
# a chat request a replica ran (its access log line), not a /render of one
CHAT_RUN = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" 200')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: process exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout} s:\n{log.read_text()}")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """SIGTERM: replicas drain, the cache-aware router shuts down; nginx wants SIGQUIT."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextmanager
def running_replicas(tmp: Path):
    """name -> (base URL, process, log) of each replica, all answering /health."""
    replicas = {}
    try:
        for name in REPLICA_NAMES:
            port, log = free_port(), tmp / f"{name}.log"
            command = [sys.executable, "-m", "server", "--model", "tiny-random", "--host",
                       "127.0.0.1", "--port", str(port), "--replica-name", name, "--threads", "1",
                       "--max-group-size", str(GROUP_SIZE), "--max-wait-ms", str(MAX_WAIT_MS)]
            process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"),
                                       stderr=subprocess.STDOUT)
            replicas[name] = (f"http://127.0.0.1:{port}", process, log)
        for url, process, log in replicas.values():
            wait_for_http(url + "/health", process, log)
        yield replicas
    finally:
        for _, process, _ in replicas.values():
            stop(process)


@contextmanager
def running_cache_router(tmp: Path, worker_urls: list[str], flags: tuple[str, ...] = (),
                         name: str = "cache-router"):
    """The shipped cache-aware router over `worker_urls`, told the replicas' group size as
    compose tells it, `flags` last; yields its base URL and its metrics' URL."""
    port, metrics_port, log = free_port(), free_port(), tmp / f"{name}.log"
    env = router_env() | {"GROUPWISE_MAX_GROUP_SIZE": str(GROUP_SIZE)}
    process = subprocess.Popen(router_command(worker_urls, port, metrics_port, flags), cwd=ROOT,
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/liveness", process, log, timeout=30)
        yield url, f"http://127.0.0.1:{metrics_port}"
    finally:
        stop(process)


def nginx_version() -> tuple[int, ...]:
    banner = subprocess.run([require_tool("nginx"), "-v"], capture_output=True, text=True).stderr
    return tuple(int(part) for part in re.search(r"nginx/([\d.]+)", banner).group(1).split("."))


def render_servers(shipped: str, ports: list[int]) -> str:
    """A shipped upstream include with its host:port fields replaced, in order. Re-resolving
    names (`resolver`, `resolve`) needs nginx >= 1.27.3 and means nothing for IP addresses,
    so it is dropped for an older local nginx; every other parameter stays."""
    remaining = iter(ports)
    text = re.sub(r"^server\s+\S+:\d+", lambda _: f"server 127.0.0.1:{next(remaining)}", shipped,
                  flags=re.M)
    assert next(remaining, None) is None, "the shipped include lists fewer servers"
    if nginx_version() < (1, 27, 3):
        text = re.sub(r"^resolver .*\n", "", text, flags=re.M).replace(" resolve ", " ")
    return text


@contextmanager
def running_front_door(tmp: Path, replica_ports: list[int], cache_router_port: int):
    """The shipped nginx.conf, verbatim, beside its three includes for this machine's ports;
    yields its base URL."""
    tmp.mkdir()
    port = free_port()
    (tmp / "nginx.conf").write_text((NGINX_DIR / "nginx.conf").read_text())
    (tmp / "listen.conf").write_text(f"listen 127.0.0.1:{port};\n")
    for include, ports in (("replicas.conf", replica_ports),
                           ("cache-router.conf", [cache_router_port])):
        (tmp / include).write_text(render_servers((NGINX_DIR / include).read_text(), ports))
    log = tmp / "nginx.log"
    command = [require_tool("nginx"), "-c", str(tmp / "nginx.conf"), "-e", "stderr",
               "-g", f"daemon off; pid {tmp / 'nginx.pid'};"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/router/health", process, log, timeout=20)
        yield url
    finally:
        stop(process, signal.SIGQUIT)  # nginx: graceful shutdown


@contextmanager
def scale_out(tmp: Path, replica_urls: list[str]):
    """The front door and the cache-aware router over `replica_urls`: the door's URL and the
    cache-aware router's metrics' URL."""
    with running_cache_router(tmp, replica_urls) as (cache_router, metrics), \
            running_front_door(tmp / "nginx", [port_of(url) for url in replica_urls],
                               port_of(cache_router)) as url:
        yield url, metrics


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """name -> base URL of each running replica."""
    with running_replicas(tmp_path_factory.mktemp("replicas")) as running:
        yield {name: url for name, (url, _, _) in running.items()}


@pytest.fixture(scope="module")
def routers(replicas, tmp_path_factory):
    """The front door's URL and the cache-aware router's metrics' URL."""
    with scale_out(tmp_path_factory.mktemp("routers"), list(replicas.values())) as urls:
        yield urls


@pytest.fixture(scope="module")
def router(routers):
    """The front door's URL."""
    return routers[0]


def passage(tag: str) -> str:
    return f"{tag}: " + "a passage that every question about it repeats first. " * 8


def chat_body(tag: str, question: str, **fields) -> dict:
    return {"model": "tiny-random", "max_tokens": 2,
            "messages": [{"role": "system", "content": passage(tag)},
                         {"role": "user", "content": question}], **fields}


async def ask_all(router_url: str, bodies: list[dict], headers: dict | None = None) -> list:
    """(replica, usage) of each body, all sent at once."""
    async with httpx.AsyncClient(base_url=router_url, timeout=60) as client:
        async def one(body: dict):
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            return response.headers["x-groupwise-replica"], response.json()["usage"]

        return await asyncio.gather(*(one(body) for body in bodies))


def computed(usage: dict) -> int:
    return usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]


def test_questions_sharing_a_passage_stay_on_one_replica_and_passages_spread(router):
    """No hints: the first question of each of 8 passages at once (long enough to be in flight
    together, so the least busy replica differs from one to the next), then two more rounds.
    Every later question finds its passage computed on the replica it is sent to."""
    tags = [f"spread-{i}" for i in range(8)]
    seen = defaultdict(set)
    first = asyncio.run(ask_all(router, [
        chat_body(tag, "question 0?", max_tokens=16, ignore_eos=True) for tag in tags]))
    for tag, (name, _) in zip(tags, first):
        seen[tag].add(name)
    for round_number in (1, 2):
        answers = asyncio.run(ask_all(router, [chat_body(tag, f"question {round_number}?")
                                               for tag in tags]))
        for tag, (name, usage) in zip(tags, answers):
            seen[tag].add(name)
            assert computed(usage) < 0.2 * usage["prompt_tokens"], (tag, usage)
    split = {tag: names for tag, names in seen.items() if len(names) != 1}
    assert not split, f"passages answered by several replicas: {split}"
    used = {name for names in seen.values() for name in names}
    assert used == set(REPLICA_NAMES), f"8 passages all went to {used}"


# The instructions a retrieval app sends before every question (bench.scale's): most of each
# prompt, so every prompt matches every other over more than the router's threshold.
INSTRUCTIONS = SYSTEM_PROMPT_FILE.read_text()


def instructed_body(tag: str, question: str, **fields) -> dict:
    return {"model": "tiny-random", "max_tokens": 2,
            "messages": [{"role": "system", "content": INSTRUCTIONS},
                         {"role": "user", "content": f"{passage(tag)}\n\nQuestion: {question}"}],
            **fields}


def first_questions(url: str, tags: list[str]) -> list[str]:
    """The first question of each passage, all at once, each generating long enough that all
    are in flight together: the replica that answered each."""
    bodies = [instructed_body(tag, "question 0?", max_tokens=64, ignore_eos=True) for tag in tags]
    return [name for name, _ in asyncio.run(ask_all(url, bodies))]


def test_a_burst_sharing_long_instructions_spreads_and_each_passage_stays_together(routers):
    """No hints, every prompt starting with the same ~2,500 tokens of instructions: the first
    questions of 10 passages at once spread over both replicas (no replica more than one group
    and one request ahead of the other), then two more rounds of questions each go to the
    replica that computed their passage and find it there."""
    router, metrics = routers
    tags = [f"instructed-{i}" for i in range(10)]
    first = first_questions(router, tags)
    counts = [first.count(name) for name in REPLICA_NAMES]
    assert max(counts) - min(counts) <= GROUP_SIZE + 1, counts
    for round_number in (1, 2):
        answers = asyncio.run(ask_all(router, [instructed_body(tag, f"question {round_number}?")
                                               for tag in tags]))
        for tag, holder, (name, usage) in zip(tags, first, answers):
            assert name == holder, f"{tag}: computed on {holder}, asked again on {name}"
            assert computed(usage) < 0.05 * usage["prompt_tokens"], (tag, usage)
    decisions = httpx.get(metrics + "/metrics").text
    assert re.search(r"^vllm_router_load_balancing_events_total [1-9]", decisions, re.M)


def test_with_the_routers_own_thresholds_the_same_burst_stays_on_one_replica(replicas, tmp_path):
    """The control: vllm-router's defaults (balance only past 64 requests in flight) send every
    prompt to the replica that saw the shared instructions first."""
    defaults = ("--cache-threshold", "0.3", "--balance-abs-threshold", "64",
                "--balance-rel-threshold", "1.5")
    with running_cache_router(tmp_path, list(replicas.values()), defaults,
                              "defaults-router") as (url, _):
        first = first_questions(url, [f"defaults-{i}" for i in range(10)])
    assert len(set(first)) == 1, first


def ask(client: httpx.Client, group_id: str) -> httpx.Response:
    body = {"model": "tiny-random", "max_tokens": 2,
            "messages": [{"role": "user", "content": f"a question about {group_id}"}]}
    return client.post("/v1/chat/completions", json=body, headers={"X-Group-Id": group_id})


def test_one_group_stays_on_one_replica_and_groups_spread(router):
    """X-Group-Id: nginx hashes it. A group's questions back to back, as they arrive; its
    prompt is not what routes it (each question has its own)."""
    seen = defaultdict(set)
    with httpx.Client(base_url=router, timeout=30) as client:
        for group_id in [f"context-{i}" for i in range(NUM_GROUPS)]:
            for _ in range(3):
                response = ask(client, group_id)
                assert response.status_code == 200, response.text
                seen[group_id].add(response.headers["x-groupwise-replica"])
    split = {group: names for group, names in seen.items() if len(names) != 1}
    assert not split, f"groups answered by several replicas: {split}"
    used = {name for names in seen.values() for name in names}
    assert used == set(REPLICA_NAMES), f"{NUM_GROUPS} groups all went to {used}"


def test_a_group_sent_at_once_meets_and_computes_its_passage_once(router):
    """GROUP_SIZE questions about one passage sent together with X-Group-Id: one replica,
    one group, the passage computed once."""
    for group in range(4):
        tag = f"group-{group}"
        answers = asyncio.run(ask_all(router, [chat_body(tag, f"question {i}?")
                                               for i in range(GROUP_SIZE)],
                                      {"X-Group-Id": tag}))
        assert len({name for name, _ in answers}) == 1, answers
        billed = sum(usage["prompt_tokens"] for _, usage in answers)
        assert sum(computed(usage) for _, usage in answers) < 0.5 * billed, answers


@pytest.mark.parametrize("headers", [{}, {"X-Group-Id": "streamed"}], ids=["prefix", "group"])
def test_streaming_passes_through_either_router_chunk_by_chunk(router, headers):
    body = chat_body("streamed", "a question?", max_tokens=4, stream=True)
    with httpx.Client(base_url=router, timeout=30) as client, \
            client.stream("POST", "/v1/chat/completions", json=body,
                          headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["x-groupwise-replica"] in REPLICA_NAMES
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3  # several chunks, not one buffered body


def test_grouped_requests_and_the_model_list_reach_a_replica(router):
    body = {"context": passage("grouped"), "questions": ["first?", "second?"], "max_tokens": 2}
    with httpx.Client(base_url=router, timeout=30) as client:
        response = client.post("/v1/grouped_completions", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["answers"]) == 2
        with client.stream("POST", "/v1/grouped_completions",
                           json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert list(streamed.iter_lines())[-2:] == ["data: [DONE]", ""]
        models = client.get("/v1/models")
    assert models.headers["x-groupwise-replica"] in REPLICA_NAMES
    assert [card["id"] for card in models.json()["data"]] == ["tiny-random"]


def test_bad_requests_get_the_replicas_errors_in_openai_shape(router):
    """Fields the router does not know pass through it to the replica, which names them;
    so do values of the router's own fields that ask for what no replica does."""
    with httpx.Client(base_url=router, timeout=30) as client:
        for field, value in (("frobnicate", 1), ("skip_special_tokens", False)):
            response = client.post("/v1/chat/completions",
                                   json=chat_body("bad", "a question?", **{field: value}))
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field
            assert response.headers["x-groupwise-replica"] in REPLICA_NAMES


def test_traffic_of_a_dead_replica_goes_to_the_live_one(replicas, tmp_path):
    """Both routers over one live replica and a closed port: every request is answered by
    the live replica, with a group id or without (nothing reached the dead one, so either
    router may send it on)."""
    live_name, live_url = next(iter(replicas.items()))
    dead_url = f"http://127.0.0.1:{free_port()}"
    with scale_out(tmp_path, [live_url, dead_url]) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as client:
        names = set()
        for i in range(8):
            for headers in ({"X-Group-Id": f"orphan-{i}"}, {}):
                response = client.post("/v1/chat/completions", headers=headers,
                                       json=chat_body(f"orphan-{i}", "a question?"))
                assert response.status_code == 200, response.text
                names.add(response.headers["x-groupwise-replica"])
    assert names == {live_name}


def test_a_stopped_replica_finishes_what_it_started_and_its_traffic_moves(tmp_path):
    """SIGTERM to the replica holding a passage while three streams run on it: the streams
    finish there; the passage's next questions go to the other replica, while the stopped one
    drains (503: never started) and after it has exited (connection refused). Every request
    ran exactly once: the replicas' access logs hold one answered chat request per request."""
    with running_replicas(tmp_path) as running, \
            scale_out(tmp_path, [url for url, _, _ in running.values()]) as (router_url, _), \
            httpx.Client(base_url=router_url, timeout=60) as client, ExitStack() as open_streams:
        first = client.post("/v1/chat/completions", json=chat_body("stopped", "first?"))
        holder = first.headers["x-groupwise-replica"]
        (other,) = set(REPLICA_NAMES) - {holder}
        streams = []
        for i in range(3):
            body = chat_body("stopped", f"stream {i}?", max_tokens=48, ignore_eos=True,
                             stream=True)
            stream = open_streams.enter_context(
                client.stream("POST", "/v1/chat/completions", json=body))
            lines = stream.iter_lines()
            assert next(line for line in lines if '"content"' in line)  # it runs
            assert stream.headers["x-groupwise-replica"] == holder
            streams.append(lines)
        _, holder_process, holder_log = running[holder]
        holder_process.terminate()

        def answered_by() -> str:
            response = client.post("/v1/chat/completions", json=chat_body("stopped", "next?"))
            assert response.status_code == 200, response.text
            return response.headers["x-groupwise-replica"]

        while_draining = [answered_by() for _ in range(4)]
        for lines in streams:
            rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        holder_process.wait(timeout=30)
        after_exit = [answered_by() for _ in range(2)]
        _, _, other_log = running[other]
        ran = {holder: len(CHAT_RUN.findall(holder_log.read_text())),
               other: len(CHAT_RUN.findall(other_log.read_text()))}
    assert while_draining + after_exit == [other] * 6
    assert ran == {holder: 1 + 3, other: 6}


# --- metric names: what Prometheus and Grafana query is what the server exports ----------

METRIC_REF = re.compile(r"(?<![\w:])groupwise:[A-Za-z0-9_:]+")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")


ROUTER_METRIC_REF = re.compile(r"\bvllm_router_\w+")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panels and variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return queries + [v["definition"] for v in dashboard["templating"]["list"]]


def rule_queries() -> list[str]:
    """Every expression of the Prometheus recording and alerting rules."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(replicas):
    """sample name -> label names seen on it, after one finished request (labelled series
    such as finish_reason only appear once something has finished)."""
    url = next(iter(replicas.values()))
    with httpx.Client(base_url=url, timeout=30) as client:
        assert ask(client, "metrics").status_code == 200
        text = client.get("/metrics").text
    labels = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return labels


def test_monitoring_queries_use_only_exported_metrics_and_labels(exported):
    """Every query on the replicas' metrics (the router's are checked against the router)."""
    queries = [query for query in dashboard_queries() + rule_queries()
               if not ROUTER_METRIC_REF.search(query)]
    referenced = set()
    for query in queries:
        names = set(METRIC_REF.findall(query))
        unknown = names - set(exported)
        assert not unknown, f"{query}\n  not exported: {unknown}"
        referenced |= names
        used_labels = {label.strip() for group in GROUPING.findall(query)
                       for label in group.split(",") if label.strip()}
        used_labels |= set(MATCHER.findall(query))
        available = set().union(*(exported[name] for name in names)) | TARGET_LABELS
        assert used_labels <= available, f"{query}\n  unknown labels: {used_labels - available}"
    assert len(referenced) >= 10


def test_dashboard_shows_every_metric_the_server_exports(exported):
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in exported
                if name.startswith("groupwise:") and not name.endswith("_created")}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", name)
             for query in dashboard_queries() for name in METRIC_REF.findall(query)}
    assert families - shown == set(), "exported but on no dashboard panel"


def test_the_dashboards_router_panels_use_what_the_cache_aware_router_exports(routers):
    """After a burst that makes it balance (so every decision it counts has happened), the
    cache-aware router's /metrics holds every vllm_router_ series the dashboard queries, with
    the labels the queries group by."""
    router, metrics = routers
    first_questions(router, [f"scraped-{i}" for i in range(10)])
    labels = defaultdict(set)
    for family in text_string_to_metric_families(httpx.get(metrics + "/metrics").text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    queries = [query for query in dashboard_queries() if ROUTER_METRIC_REF.search(query)]
    assert len(queries) >= 3
    for query in queries:
        names = set(ROUTER_METRIC_REF.findall(query))
        assert names <= set(labels), f"{query}\n  not exported: {names - set(labels)}"
        grouped = {label.strip() for group in GROUPING.findall(query)
                   for label in group.split(",") if label.strip()}
        available = set().union(*(labels[name] for name in names))
        assert grouped <= available, f"{query}\n  unknown labels: {grouped - available}"
