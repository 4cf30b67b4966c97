"""The shipped scale-out and monitoring configuration against real processes on this machine:
two `python -m server --model tiny-random` replicas behind a real nginx running the shipped
deploy/nginx/nginx.conf (only its two topology includes are written for the test ports), and
the metric names the Prometheus rules and the Grafana dashboard use, checked against /metrics.
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
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_deploy_config import DASHBOARD, DEPLOY, ROOT, require_tool

NGINX_DIR = DEPLOY / "nginx"
REPLICA_NAMES = ("replica-a", "replica-b")
NUM_GROUPS = 12
# A group of GROUP_SIZE is ready at once; a partial one waits MAX_WAIT_MS for more members,
# long enough for concurrent questions to meet even on a busy machine.
GROUP_SIZE, MAX_WAIT_MS = 4, 100
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time, not by the server


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
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nginx_version() -> tuple[int, ...]:
    banner = subprocess.run([require_tool("nginx"), "-v"], capture_output=True, text=True).stderr
    return tuple(int(part) for part in re.search(r"nginx/([\d.]+)", banner).group(1).split("."))


def render_replicas(shipped: str, replica_ports: list[int]) -> str:
    """The shipped replicas.conf with its host:port fields replaced, in order. Re-resolving
    names (`resolver`, `resolve`) needs nginx >= 1.27.3 and means nothing for IP addresses,
    so it is dropped for an older local nginx; every other parameter stays."""
    ports = iter(replica_ports)
    text = re.sub(r"^server\s+\S+:\d+", lambda _: f"server 127.0.0.1:{next(ports)}", shipped,
                  flags=re.M)
    assert next(ports, None) is None, "the shipped replicas.conf lists fewer replicas"
    if nginx_version() < (1, 27, 3):
        text = re.sub(r"^resolver .*\n", "", text, flags=re.M).replace(" resolve ", " ")
    return text


def render_router(conf_dir: Path, listen_port: int, replica_ports: list[int]) -> Path:
    """The shipped nginx.conf, verbatim, beside listen.conf and replicas.conf for this
    machine's ports."""
    conf_dir.mkdir()
    (conf_dir / "nginx.conf").write_text((NGINX_DIR / "nginx.conf").read_text())
    (conf_dir / "listen.conf").write_text(f"listen 127.0.0.1:{listen_port};\n")
    replicas = render_replicas((NGINX_DIR / "replicas.conf").read_text(), replica_ports)
    (conf_dir / "replicas.conf").write_text(replicas)
    return conf_dir / "nginx.conf"


def start_router(tmp: Path, replica_ports: list[int]) -> tuple[str, subprocess.Popen]:
    port = free_port()
    conf = render_router(tmp, port, replica_ports)
    log = tmp / "nginx.log"
    command = [require_tool("nginx"), "-c", str(conf), "-e", "stderr",
               "-g", f"daemon off; pid {tmp / 'nginx.pid'};"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/router/health", process, log, timeout=20)
    return url, process


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """name -> base URL of each running replica."""
    tmp = tmp_path_factory.mktemp("replicas")
    processes, urls = [], {}
    try:
        for name in REPLICA_NAMES:
            port, log = free_port(), tmp / f"{name}.log"
            command = [sys.executable, "-m", "server", "--model", "tiny-random", "--host",
                       "127.0.0.1", "--port", str(port), "--replica-name", name, "--threads", "1",
                       "--max-group-size", str(GROUP_SIZE), "--max-wait-ms", str(MAX_WAIT_MS)]
            processes.append(subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"),
                                              stderr=subprocess.STDOUT))
            urls[name] = (f"http://127.0.0.1:{port}", processes[-1], log)
        for url, process, log in urls.values():
            wait_for_http(url + "/health", process, log)
        yield {name: url for name, (url, _, _) in urls.items()}
    finally:
        for process in processes:
            stop(process)


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory):
    ports = [int(url.rsplit(":", 1)[1]) for url in replicas.values()]
    url, process = start_router(tmp_path_factory.mktemp("router") / "conf", ports)
    try:
        yield url
    finally:
        stop(process, signal.SIGQUIT)  # nginx: graceful shutdown


def ask(client: httpx.Client, group_id: str | None, stream: bool = False) -> httpx.Response:
    body = {"model": "tiny-random", "max_tokens": 2, "stream": stream,
            "messages": [{"role": "user", "content": f"a question about {group_id}"}]}
    headers = {"X-Group-Id": group_id} if group_id else {}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def replicas_by_group(router_url: str, group_ids: list[str], per_group: int) -> dict:
    seen = defaultdict(set)
    with httpx.Client(base_url=router_url, timeout=30) as client:
        # A group's questions back to back, as they arrive: round-robin would split them.
        for group_id in group_ids:
            for _ in range(per_group):
                response = ask(client, group_id)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] >= 1
                seen[group_id].add(response.headers["x-groupwise-replica"])
    return seen


def test_one_group_stays_on_one_replica_and_groups_spread(router):
    group_ids = [f"context-{i}" for i in range(NUM_GROUPS)]
    seen = replicas_by_group(router, group_ids, per_group=3)
    split = {group: names for group, names in seen.items() if len(names) != 1}
    assert not split, f"groups answered by several replicas: {split}"
    used = {name for names in seen.values() for name in names}
    assert used == set(REPLICA_NAMES), f"{NUM_GROUPS} groups all went to {used}"


def test_requests_without_a_group_id_spread(router):
    with httpx.Client(base_url=router, timeout=30) as client:
        names = {client.get("/v1/models").headers["x-groupwise-replica"] for _ in range(24)}
    assert names == set(REPLICA_NAMES)


def test_streaming_passes_through_the_router_token_by_token(router):
    expected = replicas_by_group(router, ["streamed"], per_group=1)["streamed"]
    with httpx.Client(base_url=router, timeout=30) as client:
        body = {"model": "tiny-random", "max_tokens": 4, "stream": True,
                "messages": [{"role": "user", "content": "a question about streamed"}]}
        with client.stream("POST", "/v1/chat/completions", json=body,
                           headers={"X-Group-Id": "streamed"}) as response:
            assert response.status_code == 200
            assert {response.headers["x-groupwise-replica"]} == expected
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3  # several chunks, not one buffered body


def test_groups_of_a_dead_replica_move_to_a_live_one(replicas, tmp_path):
    """Router over one live replica and one closed port: every group is still answered,
    POSTs included (the dead one never saw them, so nginx may send them on)."""
    live_name, live_url = next(iter(replicas.items()))
    live_port = int(live_url.rsplit(":", 1)[1])
    url, process = start_router(tmp_path / "conf", [live_port, free_port()])
    try:
        seen = replicas_by_group(url, [f"orphan-{i}" for i in range(8)], per_group=1)
    finally:
        stop(process, signal.SIGQUIT)
    assert {name for names in seen.values() for name in names} == {live_name}


async def ask_group_at_once(client: httpx.AsyncClient, tag: str, send_header: bool) -> list:
    """GROUP_SIZE questions about one shared passage, sent together; the body hint always."""
    passage = f"{tag}: " + "a passage every question of this group shares. " * 8
    headers = {"X-Group-Id": tag} if send_header else {}

    async def one(index: int) -> dict:
        body = {"model": "tiny-random", "max_tokens": 2, "group_id": tag,
                "messages": [{"role": "system", "content": passage},
                             {"role": "user", "content": f"question {index}?"}]}
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()["usage"]

    return await asyncio.gather(*(one(i) for i in range(GROUP_SIZE)))


def prompt_tokens(router_url: str, tag: str, send_header: bool) -> tuple[int, int]:
    """(billed, computed) prompt tokens over four groups."""
    async def run() -> list:
        async with httpx.AsyncClient(base_url=router_url, timeout=30) as client:
            return [u for g in range(4) for u in await ask_group_at_once(
                client, f"{tag}-{g}", send_header)]

    usages = asyncio.run(run())
    billed = sum(u["prompt_tokens"] for u in usages)
    return billed, billed - sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)


def test_group_affinity_is_what_saves_prompt_compute(router):
    """With X-Group-Id a group meets on one replica and computes its passage once; with only
    the body hint (invisible to nginx) its questions spread and each replica computes the
    passage again."""
    billed_together, computed_together = prompt_tokens(router, "grouped", send_header=True)
    billed_spread, computed_spread = prompt_tokens(router, "spreads", send_header=False)
    assert billed_together == billed_spread
    assert computed_together < 0.5 * billed_together
    assert computed_together < computed_spread


# --- metric names: what Prometheus and Grafana query is what the server exports ----------

METRIC_REF = re.compile(r"(?<![\w:])groupwise:[A-Za-z0-9_:]+")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")


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
    queries = dashboard_queries() + rule_queries()
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
