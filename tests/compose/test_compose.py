"""Static checks of the container definitions: docker-compose.yml and the two Dockerfiles.

No Docker engine is needed. docker-compose.yml is validated against the vendored Compose
Specification schema (tests/compose/compose-spec.json, from compose-spec/compose-spec), and
the deployment contract is asserted: scalable GPU workers, a one-shot migration the gateway
waits for, pinned base images, and no model stack in the gateway image. `docker compose
config -q` is in test_compose_cli.py.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).resolve().parent / "compose-spec.json"
GATEWAY_DOCKERFILE = REPO / "Dockerfile.gateway"
WORKER_DOCKERFILE = REPO / "Dockerfile.worker"

HEPATO_SERVICES = ("migrate", "gateway", "worker")
REQUIRED_ENV = (
    "HEPATO_DATABASE_URL",
    "HEPATO_REDIS_URL",
    "HEPATO_S3_ENDPOINT",
    "HEPATO_S3_ACCESS_KEY",
    "HEPATO_S3_SECRET_KEY",
    "HEPATO_S3_BUCKET",
    "HEPATO_S3_SECURE",
    "HEPATO_DATA_DIR",
    "HEPATO_MODELS_DIR",
)
MODEL_STACK = re.compile(
    r"\btorch\b|\btorchvision\b|\bultralytics\b|\bonnxruntime\b|\[[^\]]*\b(worker|torch|onnx-\w+)\b",
    re.IGNORECASE,
)
# A concrete version somewhere in the tag: 16.10, 7.4.6-alpine, RELEASE.2025-04-22T22-12-26Z.
VERSIONED_TAG = re.compile(r"\d+[.-]\d+")
# Base images of our own Dockerfiles: a patch release (3.11.14-slim-bookworm, 2.5.1-cuda12.4-...).
PATCH_TAG = re.compile(r"(?<![\d.])\d+\.\d+\.\d+")


# --------------------------------------------------------------------------- helpers


@cache
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition}; the short list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


@cache
def instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    if pending:
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    return tuple(out)


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"expected exec (JSON array) form, got {args!r}"
    return parsed


def image_is_pinned(ref: str) -> bool:
    """True for name:tag with a concrete version tag (not latest), or a digest reference."""
    if "@sha256:" in ref:
        return True
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no tag at all (the colon belonged to a registry port)
        return False
    return bool(name) and tag.lower() != "latest" and bool(VERSIONED_TAG.search(tag))


def base_images(path: Path) -> list[str]:
    """Base image references of every FROM, excluding references to earlier build stages."""
    stages: set[str] = set()
    refs: list[str] = []
    for args in args_of(path, "FROM"):
        words = [w for w in args.split() if not w.startswith("--")]
        ref = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if ref.lower() not in stages:
            refs.append(ref)
    return refs


# --------------------------------------------------------------------------- schema


def test_compose_file_matches_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert "draft-07" in schema["$schema"], "the vendored schema is expected to be Draft-07"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_schema_rejects_a_broken_compose_file() -> None:
    """Guards the guard: the validation above would catch a typo'd service key."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    broken = {"services": {"worker": {"image": "x:1.0", "conatiner_name": "oops"}}}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


# --------------------------------------------------------------------------- services


def test_expected_services_present() -> None:
    assert {"postgres", "redis", "minio", "migrate", "gateway", "worker"} <= set(services())


def test_no_service_has_a_fixed_container_name() -> None:
    named = [name for name, svc in services().items() if "container_name" in svc]
    assert not named, f"container_name prevents scaling and parallel stacks: {named}"


def test_every_third_party_image_is_pinned() -> None:
    for name, svc in services().items():
        if "build" in svc:
            continue
        ref = svc.get("image", "")
        assert image_is_pinned(ref), f"{name}: image {ref!r} is not pinned to a version tag"


def test_backing_service_images_pin_a_release() -> None:
    svcs = services()
    assert re.fullmatch(
        r"(docker\.io/)?(library/)?postgres:16\.\d+(-\S+)?", svcs["postgres"]["image"]
    )
    assert re.fullmatch(
        r"(docker\.io/)?(library/)?redis:7\.\d+\.\d+-alpine\S*", svcs["redis"]["image"]
    )
    assert re.fullmatch(r"\S*minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\S+", svcs["minio"]["image"])


def test_every_named_dockerfile_exists() -> None:
    built = 0
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = REPO / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        built += 1
    assert built >= 3


def test_backing_services_have_healthchecks_and_volumes() -> None:
    svcs = services()
    for name in ("postgres", "redis", "minio"):
        assert svcs[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in json.dumps(svcs["postgres"]["healthcheck"]["test"])
    for name in ("postgres", "minio"):
        assert svcs[name].get("volumes"), f"{name} keeps its data in no volume"
    assert compose().get("volumes"), "named volumes must be declared at the top level"


def test_hepato_services_share_the_settings_anchor() -> None:
    shared = compose()["x-hepato-env"]
    assert set(REQUIRED_ENV) <= set(shared), set(REQUIRED_ENV) - set(shared)
    assert shared["HEPATO_MODELS_DIR"] == "/app/models/manifests"
    assert shared["HEPATO_DATA_DIR"] == "/data"
    assert "@postgres:5432/" in shared["HEPATO_DATABASE_URL"]
    assert shared["HEPATO_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert shared["HEPATO_REDIS_URL"].startswith("redis://redis:6379")
    assert shared["HEPATO_S3_ENDPOINT"] == "minio:9000"
    for name in HEPATO_SERVICES:
        env = env_of(services()[name])
        for key, value in shared.items():
            assert env.get(key) == str(value), f"{name}: {key} differs from x-hepato-env"


def test_migrate_is_a_one_shot_step_after_postgres() -> None:
    migrate = services()["migrate"]
    assert command_of(migrate) == ["hepato", "migrate"]
    # A bare `restart: no` would load as the boolean False; it must be the string "no".
    assert migrate.get("restart") == "no"
    assert depends_on(migrate).get("postgres") == "service_healthy"
    assert migrate["build"]["dockerfile"] == "Dockerfile.gateway"
    assert "ports" not in migrate


def test_gateway_waits_for_migration_and_backends() -> None:
    gateway = services()["gateway"]
    deps = depends_on(gateway)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("redis") == "service_healthy"
    assert deps.get("minio") == "service_healthy"
    assert gateway["build"]["dockerfile"] == "Dockerfile.gateway"
    assert command_of(gateway) in ([], ["hepato", "gateway"])


def test_gateway_publishes_8000_and_checks_readiness() -> None:
    gateway = services()["gateway"]
    targets = []
    for port in gateway.get("ports", []):
        if isinstance(port, dict):
            targets.append(str(port.get("target")))
        else:
            targets.append(str(port).split("/")[0].rsplit(":", 1)[-1])
    assert "8000" in targets
    assert "/readyz" in json.dumps(gateway["healthcheck"]["test"])
    assert env_of(gateway).get("HEPATO_HOST", "0.0.0.0") == "0.0.0.0"


def test_worker_is_scalable() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "published host ports clash under --scale"
    # A fixed hostname would give every copy the same default worker id (host:pid).
    assert "hostname" not in worker
    assert "network_mode" not in worker
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    assert command_of(worker) == ["hepato", "worker"]
    assert worker.get("restart") == "unless-stopped"
    deps = depends_on(worker)
    assert deps.get("migrate") == "service_completed_successfully"


def test_worker_reserves_a_gpu() -> None:
    devices = services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if "gpu" in d.get("capabilities", [])]
    assert gpu, "the worker must reserve an NVIDIA GPU"
    assert gpu[0].get("driver") == "nvidia"
    count = gpu[0].get("count", "all")
    assert count == "all" or (isinstance(count, int) and count >= 1) or "device_ids" in gpu[0]


def test_worker_gets_time_to_finish_its_batch() -> None:
    worker = services()["worker"]
    grace = str(worker.get("stop_grace_period", "10s"))
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", grace)
    assert match and match.group(0), f"unparsed stop_grace_period {grace!r}"
    seconds = int(match.group(1) or 0) * 60 + int(match.group(2) or 0)
    assert seconds >= 30, f"stop_grace_period {grace} is too short for a batch"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


# --------------------------------------------------------------------------- Dockerfiles

BOTH_DOCKERFILES = pytest.mark.parametrize(
    "dockerfile", [GATEWAY_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name
)


@BOTH_DOCKERFILES
def test_base_images_are_pinned(dockerfile: Path) -> None:
    refs = base_images(dockerfile)
    assert refs, f"{dockerfile.name} has no FROM"
    for ref in refs:
        assert "$" not in ref, f"{dockerfile.name}: FROM {ref} hides the version in an ARG"
        assert image_is_pinned(ref), f"{dockerfile.name}: FROM {ref} is not a pinned version"
        tag = ref.split("@")[0].rpartition(":")[2]
        assert "@sha256:" in ref or PATCH_TAG.search(tag), f"FROM {ref}: pin a patch release"


@BOTH_DOCKERFILES
def test_images_run_as_non_root(dockerfile: Path) -> None:
    users = args_of(dockerfile, "USER")
    assert users, f"{dockerfile.name} never switches away from root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_gateway_image_has_no_model_stack() -> None:
    for args in args_of(GATEWAY_DOCKERFILE, "RUN"):
        assert not MODEL_STACK.search(args), f"Dockerfile.gateway installs the model stack: {args}"
    installs = [a for a in args_of(GATEWAY_DOCKERFILE, "RUN") if "pip install" in a]
    assert any("--no-cache-dir" in a and re.search(r"\s\.(\s|$)", a + " ") for a in installs)


def test_gateway_image_serves_on_8000() -> None:
    assert exec_form(args_of(GATEWAY_DOCKERFILE, "CMD")[-1]) == ["hepato", "gateway"]
    assert any("8000" in a.split() for a in args_of(GATEWAY_DOCKERFILE, "EXPOSE"))
    healthcheck = args_of(GATEWAY_DOCKERFILE, "HEALTHCHECK")
    assert healthcheck and "/healthz" in healthcheck[-1] and "urllib" in healthcheck[-1]


def test_worker_image_has_model_stack_and_offline_ultralytics() -> None:
    installs = [a for a in args_of(WORKER_DOCKERFILE, "RUN") if "pip install" in a]
    assert any(".[worker,onnx-gpu,torch]" in a for a in installs), (
        "Dockerfile.worker must install .[worker,onnx-gpu,torch]"
    )
    env = " ".join(args_of(WORKER_DOCKERFILE, "ENV"))
    assert re.search(r"\bYOLO_OFFLINE=1\b", env)
    assert re.search(r"\bYOLO_CONFIG_DIR=/data/ultralytics\b", env)
    assert re.search(r"\bHEPATO_MODELS_DIR=/app/models/manifests\b", env)
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    copies = args_of(WORKER_DOCKERFILE, "COPY")
    assert any(a.split()[0] == "models" for a in copies), "the weights must be in the image"


def test_worker_image_stops_gracefully() -> None:
    assert exec_form(args_of(WORKER_DOCKERFILE, "CMD")[-1]) == ["hepato", "worker"]
    assert args_of(WORKER_DOCKERFILE, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".data", ".git"):
        assert required in patterns, f".dockerignore must exclude {required}"
    assert any("__pycache__" in p for p in patterns)
