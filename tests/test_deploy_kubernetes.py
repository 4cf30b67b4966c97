"""The Kubernetes mapping of the scale-out: the manifests validate against the Kubernetes API
schemas (strict: no unknown fields), and the pieces that must agree do: the router runs the
compose router's image, lists the StatefulSet's pods as its replicas, and ports and probes
match the images."""

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


def test_kustomization_applies_the_manifests():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["kubernetes/groupwise.yaml"]


def router_flag(name: str) -> str:
    """The value deploy/router/start.sh gives a vllm-router flag."""
    return re.search(rf"--{name} (\S+)", (DEPLOY / "router" / "start.sh").read_text()).group(1)


def test_router_lists_every_replica_pod_by_its_stable_name():
    everything = resources()
    statefulset = everything["StatefulSet/groupwise"]
    service = everything[f"Service/{statefulset['spec']['serviceName']}"]
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    port = only_container(statefulset)["ports"][0]["containerPort"]
    expected = [f"http://groupwise-{i}.{service['metadata']['name']}.default.svc.cluster.local:"
                f"{port}" for i in range(statefulset["spec"]["replicas"])]
    router = only_container(everything["Deployment/groupwise-router"])
    assert router["args"] == ["--worker-urls", *expected]


def test_router_runs_the_compose_router_image_on_its_ports():
    router = resources()["Deployment/groupwise-router"]
    # one router: its prefix tree is its own, a second one would split the passages
    assert router["spec"]["replicas"] == 1
    container = only_container(router)
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    assert compose["services"]["router"]["image"].endswith(f":-{container['image']}}}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(router_flag("port")),
                     "metrics": int(router_flag("prometheus-port"))}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    annotations = router["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


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
