"""Rendering deploy/kubernetes with `kubectl kustomize` and reading what the rendered
objects tell a HepatoAI process: its command, its environment, its settings."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import typer.main
import yaml

from hepato.cli.main import app as cli_app
from hepato.common.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (KUBE / "components").iterdir() if p.is_dir())
# Each overlay alone, and the GPU overlay with each component: every file is rendered.
RENDERS = [*(f"overlays/{o}" for o in OVERLAYS), *(f"overlays/gpu+{c}" for c in COMPONENTS)]
KEDA_SCHEMAS = Path(__file__).resolve().parent / "keda-crd-schemas.json"
# The Kubernetes releases the manifests must be valid for: an old one still common in
# managed clusters, and the newest that kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.37")
# `labels:` and `components:` in the kustomizations need kustomize v5 (kubectl >= 1.27).
MIN_KUSTOMIZE_MAJOR = 5
# Debian's own kubectl (kubernetes-client) is 1.20, with kustomize v2.0.3: too old.
NO_KUBECTL = (
    "`kubectl kustomize` with kustomize >= v5 is needed (kubectl >= 1.27; this project's "
    "machine image ships the Debian package 'kubectl' 1.32 with kustomize v5.5.0); "
    "Debian's own kubernetes-client is 1.20, whose kustomize v2.0.3 cannot read these "
    "kustomizations"
)


@cache
def kubectl() -> str:
    """kubectl on PATH whose built-in kustomize is new enough; fails (never skips) without."""
    found = shutil.which("kubectl")
    assert found, f"no kubectl on PATH: {NO_KUBECTL}"
    out = subprocess.run(
        [found, "version", "--client"], capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"Kustomize Version: v(\d+)\.", out)
    assert match and int(match.group(1)) >= MIN_KUSTOMIZE_MAJOR, f"{out.strip()}: {NO_KUBECTL}"
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # kustomize v5 warns on stderr about deprecated fields: none are used here.
    assert "deprecated" not in result.stderr.lower(), result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def _rendered(name: str, scratch: Path) -> tuple[dict[str, Any], ...]:
    overlay, _, component = name.partition("+")
    if not component:
        return tuple(kustomize(KUBE / overlay))
    # A throwaway overlay: the named one plus a component (kustomize wants relative paths).
    root = scratch / name.replace("/", "-")
    root.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(KUBE, root))
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / overlay)],
                "components": [str(rel / "components" / component)],
            }
        ),
        encoding="utf-8",
    )
    return tuple(kustomize(root))


def rendered(name: str, scratch: Path) -> list[dict[str, Any]]:
    return list(_rendered(name, scratch))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every Deployment and Job."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def worker_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in of_kind(objects, "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0]["command"][1:2] == ["worker"]
    ]


# --------------------------------------------------------------------------- settings


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container starts with: envFrom first, then env (which wins);
    a value from the downward API stands as its field path."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = named(objects, "ConfigMap", source["configMapRef"]["name"])
            env.update(cm.get("data") or {})
        else:
            env.update(secret_data(named(objects, "Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = f"<{item['valueFrom']['fieldRef']['fieldPath']}>"
    return env


def env_prefix() -> str:
    return str(Settings.model_config["env_prefix"])


def setting_names() -> set[str]:
    """Every environment variable Settings reads: the prefix and each field's name."""
    return {env_prefix() + name.upper() for name in Settings.model_fields}


def settings_of(env: dict[str, str]) -> Settings:
    """Settings as the process reads them from exactly this environment (no .env file)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)


# --------------------------------------------------------------------------- the CLI


def cli_params(command: list[str]) -> tuple[str, dict[str, Any]]:
    """(subcommand, its parsed options) of a `hepato <subcommand> ...` command line, by
    the typer app's own parser: an option it does not know fails here."""
    assert command[0] == "hepato", command
    group = typer.main.get_command(cli_app)
    sub = group.commands[command[1]]  # type: ignore[attr-defined]
    ctx = sub.make_context(command[1], list(command[2:]))
    return command[1], dict(ctx.params)


def command_line(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def served_models(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> list[str]:
    """The models a worker Deployment's process serves: --model, else the settings'."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    _, params = cli_params(command_line(container))
    settings = settings_of(container_env(objects, container))
    return list(params["model"] or settings.worker_models or [settings.default_model])


# --------------------------------------------------------------------------- KEDA


@cache
def keda_schemas() -> dict[str, Any]:
    return json.loads(KEDA_SCHEMAS.read_text(encoding="utf-8"))


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as kubernetes-validate's strict mode
    does for the built-in kinds: the API server would silently prune them instead."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
