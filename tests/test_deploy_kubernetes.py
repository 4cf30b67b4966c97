"""The Kubernetes mapping of the scale-out: the manifests validate against the Kubernetes API
schemas (strict: no unknown fields), and the pieces that must agree do: the router's
ConfigMap is built from the shipped nginx files, its replica list names the StatefulSet's
pods, and ports and probes match the image."""

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


def test_router_lists_every_replica_pod_by_its_stable_name():
    everything = resources()
    statefulset = everything["StatefulSet/groupwise"]
    service = everything[f"Service/{statefulset['spec']['serviceName']}"]
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    port = only_container(statefulset)["ports"][0]["containerPort"]
    expected = {f"groupwise-{i}.{service['metadata']['name']}.default.svc.cluster.local:{port}"
                for i in range(statefulset["spec"]["replicas"])}
    listed = re.findall(r"^server\s+(\S+)", (DEPLOY / "kubernetes/replicas.conf").read_text(),
                        re.M)
    assert set(listed) == expected


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
