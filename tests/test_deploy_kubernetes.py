"""The Kubernetes mapping of the scale-out: the manifests validate against the Kubernetes API
schemas (strict: no unknown fields), and the pieces that must agree do: nginx's ConfigMap is
built from the shipped nginx files, nginx and the cache-aware router list the StatefulSet's
pods, nginx finds the cache-aware router's Service, ports and probes match the images, and the
cache-aware router balances with the replicas' group size."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = DEPLOY / "kubernetes" / "groupwise.yaml"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def resources() -> dict[str, dict]:
    """kind/name -> resource."""
    return {f"{r['kind']}/{r['metadata']['name']}": r
            for r in yaml.safe_load_all(MANIFESTS.read_text())}


def only_container(resource: dict) -> dict:
    (container,) = resource["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_api_schema(version):
    for key, resource in resources().items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key} on Kubernetes {version}: {exc.message}")


def test_validation_rejects_a_misspelled_field():
    statefulset = resources()["StatefulSet/groupwise"]
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[-1], strict=True)


def test_router_config_map_is_built_from_the_shipped_nginx_files():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["kubernetes/groupwise.yaml"]
    (generator,) = kustomization["configMapGenerator"]
    files = dict(entry.split("=") for entry in generator["files"])
    assert files["nginx.conf"] == "nginx/nginx.conf"  # the compose router's file, not a copy
    assert files["listen.conf"] == "nginx/listen.conf"
    assert set(files) == {"nginx.conf", "listen.conf", "replicas.conf", "cache-router.conf"}
    for path in files.values():
        assert (DEPLOY / path).is_file(), path

    router = resources()["Deployment/groupwise-router"]
    (volume,) = router["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == generator["name"]
    container = only_container(router)
    (mount,) = container["volumeMounts"]
    assert container["command"][container["command"].index("-c") + 1] == (
        mount["mountPath"] + "/nginx.conf")
    listen = re.search(r"listen\s+(\d+);", (DEPLOY / "nginx" / "listen.conf").read_text())
    assert container["ports"][0]["containerPort"] == int(listen.group(1))


def replica_pods() -> list[str]:
    """host:port of every StatefulSet pod, by its stable name."""
    everything = resources()
    statefulset = everything["StatefulSet/groupwise"]
    service = everything[f"Service/{statefulset['spec']['serviceName']}"]
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    port = only_container(statefulset)["ports"][0]["containerPort"]
    return [f"groupwise-{i}.{service['metadata']['name']}.default.svc.cluster.local:{port}"
            for i in range(statefulset["spec"]["replicas"])]


def test_both_routers_list_every_replica_pod_by_its_stable_name():
    listed = re.findall(r"^server\s+(\S+)", (DEPLOY / "kubernetes/replicas.conf").read_text(),
                        re.M)
    assert listed == replica_pods()
    cache_router = only_container(resources()["Deployment/groupwise-cache-router"])
    assert cache_router["args"] == ["--worker-urls", *(f"http://{pod}" for pod in replica_pods())]


def router_flag(name: str) -> str:
    """The value deploy/router/start.sh gives a vllm-router flag."""
    return re.search(rf"--{name} (\S+)", (DEPLOY / "router" / "start.sh").read_text()).group(1)


def test_nginx_finds_the_cache_aware_router_on_its_service():
    everything = resources()
    deployment = everything["Deployment/groupwise-cache-router"]
    # one router: its prefix tree is its own, a second one would split the passages
    assert deployment["spec"]["replicas"] == 1
    service = everything["Service/groupwise-cache-router"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    (named,) = re.findall(r"^server\s+(\S+)",
                          (DEPLOY / "kubernetes/cache-router.conf").read_text(), re.M)
    assert named == f"groupwise-cache-router.default.svc.cluster.local:{port['port']}"
    container = only_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] == "http"
    assert ports == {"http": int(router_flag("port")),
                     "metrics": int(router_flag("prometheus-port"))}


def test_cache_aware_router_runs_the_compose_image_with_its_probes():
    deployment = resources()["Deployment/groupwise-cache-router"]
    container = only_container(deployment)
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    assert compose["services"]["cache-router"]["image"].endswith(f":-{container['image']}}}")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == router_flag("prometheus-port")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001


def test_replica_probes_and_scrape_annotations_match_the_server():
    statefulset = resources()["StatefulSet/groupwise"]
    container = only_container(statefulset)
    assert container["ports"][0]["containerPort"] == 8000  # the image's GROUPWISE_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # /health is 503 while draining; liveness must not restart a draining replica
    assert "tcpSocket" in container["livenessProbe"]
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "8000"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GROUPWISE_THREADS"] == container["resources"]["requests"]["cpu"]
    security = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001


def test_the_cache_aware_router_is_told_the_replicas_group_size():
    """start.sh sets the router's balance threshold from GROUPWISE_MAX_GROUP_SIZE: the value
    the router gets is the one the replicas run with."""
    def env(key: str) -> dict:
        return {e["name"]: e.get("value") for e in only_container(resources()[key])["env"]}

    replicas, router = env("StatefulSet/groupwise"), env("Deployment/groupwise-cache-router")
    assert router["GROUPWISE_MAX_GROUP_SIZE"] == replicas["GROUPWISE_MAX_GROUP_SIZE"]
