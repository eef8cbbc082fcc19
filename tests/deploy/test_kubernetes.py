"""Offline checks of deploy/kubernetes: every overlay renders with `kubectl kustomize`,
every object is valid against the Kubernetes schemas in strict mode (kubernetes-validate;
unknown fields are errors), and what the pods run is what the code reads: the `hepato`
CLI's own parser takes their command lines, their environment names are Settings
fields, their ports and probes are the ones the processes serve.

No cluster is needed. KEDA's objects are checked in test_keda.py, the migration wait
against a real Postgres in test_wait_for_schema.py."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from fastapi.routing import APIRoute

from hepato.gateway.app import create_app
from tests.compose.test_compose import GATEWAY_DOCKERFILE, WORKER_DOCKERFILE, args_of
from tests.deploy.kube import (
    KUBERNETES_VERSIONS,
    RENDERS,
    REPO,
    cli_params,
    command_line,
    container_env,
    containers,
    env_prefix,
    named,
    of_kind,
    pod_specs,
    rendered,
    setting_names,
    settings_of,
    worker_deployments,
)

EACH_RENDER = pytest.mark.parametrize("render", RENDERS)
EACH_OVERLAY = pytest.mark.parametrize("render", [r for r in RENDERS if "+" not in r])
# Kinds validated against a vendored CRD schema instead (test_keda.py).
CRD_KINDS = {"ScaledObject", "TriggerAuthentication"}
GPU = "nvidia.com/gpu"
WAIT_FOR_SCHEMA = "alembic --config /app/alembic.ini current --check-heads"


def validation_errors(obj: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


# --------------------------------------------------------------------------- schemas


@EACH_RENDER
def test_every_object_is_valid_for_kubernetes_in_strict_mode(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret", "ScaledObject"} <= kinds
    errors = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            # A kind with no bundled schema raises SchemaNotFoundError here: a failure.
            error = validation_errors(obj, version)
            if error:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} ({version}) {error}")
    assert not errors, "\n".join(errors)


def test_strict_mode_refuses_a_misspelt_field(scratch: Path) -> None:
    """Guards the guard: a field the API server would drop without a word fails here."""
    worker = copy.deepcopy(named(rendered("overlays/gpu", scratch), "Deployment", "hepato-worker"))
    assert validation_errors(worker, KUBERNETES_VERSIONS[-1]) is None
    pod = worker["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    error = validation_errors(worker, KUBERNETES_VERSIONS[-1])
    assert error and "terminationGracePeriod" in error


@EACH_RENDER
def test_every_namespaced_object_is_in_the_hepato_namespace(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    assert [o["metadata"]["name"] for o in of_kind(objects, "Namespace")] == ["hepato"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "hepato", obj["metadata"]


# --------------------------------------------------------------------------- what runs


@EACH_OVERLAY
def test_commands_are_hepato_cli_commands(render: str, scratch: Path) -> None:
    """Each main container runs `hepato <command>` as the CLI parses it (an unknown
    option fails in the parser), through the console script pyproject installs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert "hepato" in scripts
    objects = rendered(render, scratch)
    seen = {}
    for workload, spec in pod_specs(objects):
        name, params = cli_params(command_line(spec["containers"][0]))
        seen[workload["metadata"]["name"]] = name
        if name == "worker":
            assert params["model"] and not params["burst"], params
    assert seen == {
        "hepato-gateway": "gateway",
        "hepato-worker": "worker",
        "hepato-migrate": "migrate",
    }
    # The same commands the images run by default.
    assert args_of(GATEWAY_DOCKERFILE, "CMD")[-1] == '["hepato", "gateway"]'
    assert args_of(WORKER_DOCKERFILE, "CMD")[-1] == '["hepato", "worker"]'


@EACH_OVERLAY
def test_every_environment_name_is_a_setting(render: str, scratch: Path) -> None:
    """Names come from the Settings class itself: a misspelt HEPATO_ variable would be
    ignored by the process without a word."""
    objects = rendered(render, scratch)
    names = setting_names()
    assert "HEPATO_WORKER_METRICS_PORT" in names and env_prefix() == "HEPATO_"
    for _, spec in pod_specs(objects):
        for container in containers(spec):
            unknown = set(container_env(objects, container)) - names
            assert not unknown, f"{container['name']}: not settings: {sorted(unknown)}"
            settings_of(container_env(objects, container))  # every value parses
    settings_cm = named(objects, "ConfigMap", "hepato-settings")
    assert set(settings_cm["data"]) <= names
    secret = named(objects, "Secret", "hepato-secrets")
    assert set(secret["stringData"]) <= names
    # URLs and keys live in the Secret, not the ConfigMap.
    for key in ("DATABASE_URL", "REDIS_URL", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert "HEPATO_" + key in secret["stringData"]
        assert "HEPATO_" + key not in settings_cm["data"]


@EACH_OVERLAY
def test_gateway_port_and_probes_are_the_ones_it_serves(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    gateway = named(objects, "Deployment", "hepato-gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    settings = settings_of(container_env(objects, container))
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}
    routes = {
        r.path
        for r in create_app().routes
        if isinstance(r, APIRoute) and "GET" in (r.methods or ())
    }
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in (*probes.values(), container["startupProbe"]["httpGet"]):
        assert probe["path"] in routes and probe["port"] in ports
    # Metrics: the gateway's /metrics on the Service's named port (ServiceMonitor-ready).
    assert "/metrics" in routes
    service = named(objects, "Service", "hepato-gateway")
    assert (
        service["spec"]["selector"].items()
        <= gateway["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


@EACH_OVERLAY
def test_worker_metrics_port_is_served_where_prometheus_can_reach_it(
    render: str, scratch: Path
) -> None:
    objects = rendered(render, scratch)
    for worker in worker_deployments(objects):
        container = worker["spec"]["template"]["spec"]["containers"][0]
        settings = settings_of(container_env(objects, container))
        assert settings.worker_metrics_port > 0
        assert settings.worker_metrics_host == "0.0.0.0", "loopback is unreachable from Prometheus"
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "metrics": settings.worker_metrics_port
        }
        annotations = worker["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(settings.worker_metrics_port)
        labels = worker["spec"]["template"]["metadata"]["labels"]
        services = [
            s
            for s in of_kind(objects, "Service")
            if s["spec"]["selector"].items() <= labels.items()
        ]
        assert [p["targetPort"] for s in services for p in s["spec"]["ports"]] == ["metrics"]


@EACH_OVERLAY
def test_worker_serves_a_model_the_images_ship(render: str, scratch: Path) -> None:
    from hepato.common.manifest import load_registry
    from tests.deploy.kube import served_models

    shipped = load_registry(REPO / "models" / "manifests")
    objects = rendered(render, scratch)
    for worker in worker_deployments(objects):
        container = worker["spec"]["template"]["spec"]["containers"][0]
        settings = settings_of(container_env(objects, container))
        assert settings.models_dir == Path("/app/models/manifests")
        assert any(a.split()[0] == "models" for a in args_of(WORKER_DOCKERFILE, "COPY"))
        assert set(served_models(objects, worker)) <= set(shipped)


# --------------------------------------------------------------------------- GPU / CPU


def test_gpu_worker_takes_one_gpu_and_tolerates_gpu_nodes(scratch: Path) -> None:
    objects = rendered("overlays/gpu", scratch)
    worker = named(objects, "Deployment", "hepato-worker")
    spec = worker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert str(container["resources"]["limits"][GPU]) == "1"
    assert any(
        t["key"] == GPU
        and t.get("operator") in ("Exists", "Equal")
        and t.get("effect") in (None, "NoSchedule")
        for t in spec["tolerations"]
    )
    assert settings_of(container_env(objects, container)).device == "cuda"
    # No surge: a rollout must not need a spare GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_cpu_worker_asks_for_no_gpu(scratch: Path) -> None:
    objects = rendered("overlays/cpu", scratch)
    worker = named(objects, "Deployment", "hepato-worker")
    spec = worker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert GPU not in container["resources"].get("limits", {})
    assert GPU not in container["resources"].get("requests", {})
    assert not [t for t in spec.get("tolerations", []) if t.get("key") == GPU]
    settings = settings_of(container_env(objects, container))
    assert settings.device == "cpu"
    assert 0 < settings.cpu_threads <= int(container["resources"]["requests"]["cpu"])


def test_only_workers_ask_for_gpus(scratch: Path) -> None:
    for render in ("overlays/gpu", "overlays/cpu"):
        for workload, spec in pod_specs(rendered(render, scratch)):
            if workload["metadata"]["name"] != "hepato-worker":
                for c in containers(spec):
                    assert GPU not in str(c.get("resources")), (render, c["name"])


# --------------------------------------------------------------------------- start order


@EACH_OVERLAY
def test_gateway_and_workers_wait_for_the_migration_job(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    job = named(objects, "Job", "hepato-migrate")
    job_container = job["spec"]["template"]["spec"]["containers"][0]
    assert cli_params(command_line(job_container))[0] == "migrate"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    gateway_image = named(objects, "Deployment", "hepato-gateway")["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert job_container["image"] == gateway_image, "migrations ship in the gateway image"
    for name in ("hepato-gateway", "hepato-worker"):
        spec = named(objects, "Deployment", name)["spec"]["template"]["spec"]
        (wait,) = spec["initContainers"]
        assert wait["image"] == gateway_image
        assert wait["command"][:2] == ["sh", "-c"]
        assert re.match(rf"until {re.escape(WAIT_FOR_SCHEMA)};", wait["command"][2])
        assert container_env(objects, wait) == container_env(objects, job_container)
    # The alembic.ini the wait names is where the gateway image puts it.
    assert args_of(GATEWAY_DOCKERFILE, "WORKDIR") == ["/app"]
    assert any(a.split()[0] == "alembic.ini" for a in args_of(GATEWAY_DOCKERFILE, "COPY"))


@EACH_OVERLAY
def test_images_are_pinned_and_pods_run_as_the_images_user(render: str, scratch: Path) -> None:
    for dockerfile in (GATEWAY_DOCKERFILE, WORKER_DOCKERFILE):
        assert any("useradd --system --uid 10001" in a for a in args_of(dockerfile, "RUN"))
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    for _, spec in pod_specs(rendered(render, scratch)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for c in containers(spec):
            name, _, tag = c["image"].rpartition(":")
            # The release the images are built from (pyproject's version), never latest.
            assert name in ("hepato/gateway", "hepato/worker") and tag == version, c["image"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
