"""The queue-driven autoscaling of deploy/kubernetes, offline: KEDA's objects against
KEDA's own CRD schema (vendored in keda-crd-schemas.json, unknown fields refused), the
lists they watch against the queue names the code builds (common.constants.queue_key),
and a scale-in that cannot cut a worker short of what it holds."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from hepato.common.constants import PUBLIC_TENANT, Priority, queue_key
from hepato.common.manifest import load_registry
from hepato.common.metrics import GatewayCollector
from hepato.common.settings import Settings
from hepato.common.tenants import TENANT_PATTERN
from tests.deploy.kube import (
    RENDERS,
    REPO,
    container_env,
    keda_schemas,
    named,
    of_kind,
    rendered,
    secret_data,
    served_models,
    settings_of,
    strict,
    worker_deployments,
)

EACH_RENDER = pytest.mark.parametrize("render", RENDERS)
EACH_OVERLAY = pytest.mark.parametrize("render", [r for r in RENDERS if "+" not in r])
QUEUE = re.compile(r"hepato:queue:(?P<model>[^:]+):(?P<priority>[^:]+):(?P<tenant>[^:]+)")
# KEDA's default maxReplicaCount, in the CRD's one CEL rule (min <= max).
KEDA_DEFAULT_MAX = 100


def validator(kind: str) -> jsonschema.Validator:
    schema = strict(keda_schemas()["schemas"][kind])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    errors = validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def scaled_object(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, Any]:
    name = deployment["metadata"]["name"]
    (found,) = [
        s for s in of_kind(objects, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    return found


def worker_settings(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> Settings:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return settings_of(container_env(objects, container))


def redis_triggers(so: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in so["spec"]["triggers"] if t["type"] == "redis"]


# --------------------------------------------------------------------------- schema


@EACH_RENDER
def test_keda_objects_match_the_keda_crd_schema(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    keda = [o for o in objects if o["apiVersion"] == keda_schemas()["apiVersion"]]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    for obj in keda:
        assert not schema_errors(obj), (obj["metadata"]["name"], schema_errors(obj))
    for so in of_kind(objects, "ScaledObject"):
        # The CRD's x-kubernetes-validations rule, which JSON Schema cannot express.
        spec = so["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", KEDA_DEFAULT_MAX)


def test_keda_schema_refuses_misspelt_fields_and_numbers_in_metadata(scratch: Path) -> None:
    """Guards the guard, as test_compose does for the compose spec."""
    so = named(rendered("overlays/gpu", scratch), "ScaledObject", "hepato-worker")
    assert not schema_errors(so)
    typo = copy.deepcopy(so)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    assert any("maxReplicas" in e for e in schema_errors(typo))
    number = copy.deepcopy(so)
    number["spec"]["triggers"][0]["metadata"]["listLength"] = 128  # KEDA wants strings
    assert schema_errors(number)
    auth = copy.deepcopy(
        named(rendered("overlays/gpu", scratch), "TriggerAuthentication", "hepato-redis")
    )
    auth["spec"]["secretTargetRef"][0]["secret"] = auth["spec"]["secretTargetRef"][0].pop("name")
    assert schema_errors(auth)


# --------------------------------------------------------------------------- what it watches


@EACH_RENDER
def test_each_worker_deployment_scales_on_its_models_lists(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    workers = worker_deployments(objects)
    assert workers and len(of_kind(objects, "ScaledObject")) == len(workers)
    shipped = load_registry(REPO / "models" / "manifests")
    for worker in workers:
        so = scaled_object(objects, worker)
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 0 <= so["spec"]["minReplicaCount"] <= 1 <= so["spec"]["maxReplicaCount"]
        assert "replicas" not in worker["spec"], "an apply would undo the autoscaler's count"
        models = served_models(objects, worker)
        triggers = redis_triggers(so)
        if "prometheus" in render:
            assert not triggers
            continue
        watched: dict[str, set[str]] = {}
        for trigger in triggers:
            meta = trigger["metadata"]
            match = QUEUE.fullmatch(meta["listName"])
            assert match, meta["listName"]
            model, priority, tenant = match["model"], match["priority"], match["tenant"]
            assert model in models and TENANT_PATTERN.fullmatch(tenant)
            assert meta["listName"] == queue_key(model, priority, tenant)
            watched.setdefault(f"{model} {tenant}", set()).add(priority)
            # Another worker only for more than one microbatch queued per worker.
            assert int(meta["listLength"]) >= shipped[model].max_batch_size
            assert int(meta["activationListLength"]) >= 0
        # Every tenant watched has both lists, and the open mode's tenant is always there.
        assert all(p == {q.value for q in Priority} for p in watched.values()), watched
        assert {f"{m} {PUBLIC_TENANT}" for m in models} <= set(watched)
        if "tenant-queues" in render:
            assert {t.split()[1] for t in watched} - {PUBLIC_TENANT}, "no tenant added"


@EACH_RENDER
def test_redis_triggers_reach_the_redis_the_workers_use(render: str, scratch: Path) -> None:
    """KEDA takes host:port, a password, a database index and a TLS flag where the
    workers take one URL: the two must name the same Redis and database."""
    objects = rendered(render, scratch)
    for worker in worker_deployments(objects):
        url = urlsplit(worker_settings(objects, worker).redis_url)
        for trigger in redis_triggers(scaled_object(objects, worker)):
            meta = trigger["metadata"]
            assert meta["databaseIndex"] == (url.path.strip("/") or "0")
            assert meta["enableTLS"] == str(url.scheme == "rediss").lower()
            auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            params = {
                ref["parameter"]: secret_data(named(objects, "Secret", ref["name"]))[ref["key"]]
                for ref in auth["spec"]["secretTargetRef"]
            }
            assert params["address"] == f"{url.hostname}:{url.port or 6379}"
            assert params.get("password", "") == (url.password or "")


def test_the_prometheus_alternative_reads_the_gateways_queue_depth(scratch: Path) -> None:
    objects = rendered("overlays/gpu+prometheus-queue-depth", scratch)
    families = {f.name: f for f in GatewayCollector().describe()}
    for worker in worker_deployments(objects):
        (trigger,) = scaled_object(objects, worker)["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        selector = re.search(r"(hepato_\w+)\{model=\"([^\"]+)\"\}", query)
        assert selector, query
        metric, model = selector.groups()
        assert metric in families and metric == "hepato_queue_depth"
        assert model in served_models(objects, worker)
        # Summed over the priorities it is labelled with; the tenants are summed already.
        assert "sum without (priority)" in query
        assert int(trigger["metadata"]["threshold"]) >= 1


# --------------------------------------------------------------------------- scale-in


def drain_budget_s(settings: Settings) -> float:
    """Longest a worker may take to finish what it holds after SIGTERM: the microbatch
    being decoded, the one on the model and those prepared ahead (each model call
    bounded by model_timeout_s), and the write's Postgres retries (bounded by lease_s,
    worker.recovery.db_retry). tests/chaos/test_workers.py
    test_sigterm_mid_batch_finishes_it_takes_nothing_new_and_exits_fast shows the drain."""
    return (
        settings.decode_timeout_s
        + (settings.prefetch_batches + 1) * settings.model_timeout_s
        + settings.lease_s
    )


@EACH_OVERLAY
def test_scale_in_gives_a_worker_time_to_finish_what_it_holds(render: str, scratch: Path) -> None:
    objects = rendered(render, scratch)
    for worker in worker_deployments(objects):
        spec = worker["spec"]["template"]["spec"]
        settings = worker_settings(objects, worker)
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > drain_budget_s(settings) > settings.lease_s, (grace, settings)
        # SIGTERM reaches the worker itself: no hook in front of it, no other command.
        assert "lifecycle" not in spec["containers"][0]
        assert spec["containers"][0]["command"] == ["hepato", "worker"]
