"""Webhooks (issue 12, item 2): each tenant signs with its own secret, so no tenant can
forge another's; callbacks never reach loopback, link-local, private or the stack's own
addresses unless the allow-list names them, checked at submission and again at delivery."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, text
from standardwebhooks import Webhook

from hepato.common import egress, tenants
from hepato.common.exceptions import CallbackRefused
from hepato.common.settings import Settings
from hepato.common.tables import WebhookDelivery
from hepato.worker.backends.base import Model
from hepato.worker.runner import Worker
from hepato.worker.webhook_sender import WebhookSender
from tests.conftest import REPO
from tests.e2e import conftest as e2e
from tests.e2e import test_webhooks as e2e_webhooks
from tests.e2e.test_webhooks import Receiver
from tests.security import auth
from tests.security.auth import MakeClient, bearer, one

pytestmark = pytest.mark.slow

# Fixtures shared with the other security tests and the end-to-end webhook tests.
engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of
receiver = e2e_webhooks.receiver
models = e2e.models

# The open mode's secret: it must verify no tenant's webhook.
SHARED = "whsec_" + base64.b64encode(b"hepato-shared-webhook-secret-32b").decode()
LOOPBACK_ALLOWED = {"webhook_allowed_hosts": ["127.0.0.1"], "webhook_secret": SHARED}
PUBLIC_IP = "93.184.216.34"


def deliveries(db: Engine) -> dict[str, WebhookDelivery]:
    with db.connect() as conn:
        return {
            row.id: WebhookDelivery(**row._mapping) for row in conn.execute(select(WebhookDelivery))
        }


def add_delivery(db: Engine, delivery_id: str, tenant: str, url: str) -> None:
    body = json.dumps({"type": "job.finished", "timestamp": "t", "data": {"id": delivery_id}})
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_deliveries (id, tenant, url, body, state, attempts) "
                "VALUES (:id, :tenant, :url, :body, 'pending', 0)"
            ),
            {"id": delivery_id, "tenant": tenant, "url": url, "body": body},
        )


def verifies(secret: str, request: tuple[dict[str, str], bytes]) -> bool:
    headers, body = request
    try:
        Webhook(secret).verify(body, headers)
    except Exception:
        return False
    return True


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names answered in-process (as a DNS server would, and may change): what a test
    puts here resolves to it; other names as the system resolves them."""
    answers: dict[str, list[str]] = {}
    real = egress.resolve

    def resolve(host: str, port: int) -> list[str]:
        return answers[host] if host in answers else real(host, port)

    monkeypatch.setattr(egress, "resolve", resolve)
    return answers


# --- one secret per tenant ---------------------------------------------------------------
def test_one_tenants_secret_does_not_verify_anothers_webhook(
    make_client: MakeClient,
    settings: Settings,
    engine: Engine,
    models: dict[str, Model],
    receiver: Receiver,
) -> None:
    lab_a = tenants.create_key(engine, "lab-a")
    lab_b = tenants.create_key(engine, "lab-b")
    assert lab_a.webhook_secret and lab_b.webhook_secret
    assert (
        lab_a.webhook_secret.startswith("whsec_") and lab_a.webhook_secret != lab_b.webhook_secret
    )
    # A second key of a tenant keeps the tenant's secret (its receivers verify with it).
    assert tenants.create_key(engine, "lab-a").webhook_secret is None

    client = make_client(**LOOPBACK_ALLOWED)
    job_of: dict[str, str] = {}
    for created in (lab_a, lab_b):
        answer = client.post(
            "/v1/jobs",
            files=one(),
            data={"callback_url": receiver.url},
            headers=bearer(created.key),
        )
        assert answer.status_code == 202, answer.text
        job_of[answer.json()["job_id"]] = created.tenant
    hook_settings = settings.model_copy(update=LOOPBACK_ALLOWED)
    Worker(hook_settings, models, burst=True).run(install_signals=False)
    assert WebhookSender(hook_settings, engine).deliver_once() == 2

    by_tenant = {
        job_of[json.loads(body)["data"]["job_id"]]: (headers, body)
        for headers, body in receiver.requests
    }
    assert set(by_tenant) == {"lab-a", "lab-b"}
    assert verifies(lab_a.webhook_secret, by_tenant["lab-a"])
    assert verifies(lab_b.webhook_secret, by_tenant["lab-b"])
    assert not verifies(lab_a.webhook_secret, by_tenant["lab-b"]), "A verified B's webhook"
    assert not verifies(lab_b.webhook_secret, by_tenant["lab-a"]), "B verified A's webhook"
    assert not any(verifies(SHARED, request) for request in by_tenant.values())


def test_a_rotated_secret_signs_from_then_on_and_the_old_one_only_for_the_overlap(
    settings: Settings,
    engine: Engine,
    receiver: Receiver,
) -> None:
    old = tenants.create_key(engine, "lab-a").webhook_secret
    assert old is not None
    new = tenants.rotate_webhook_secret(engine, "lab-a")
    assert new.startswith("whsec_") and new != old
    add_delivery(engine, "msg_in_overlap", "lab-a", receiver.url)
    WebhookSender(settings.model_copy(update=LOOPBACK_ALLOWED), engine).deliver_once()
    add_delivery(engine, "msg_after_overlap", "lab-a", receiver.url)
    after = {**LOOPBACK_ALLOWED, "webhook_secret_overlap_s": 0.0}
    WebhookSender(settings.model_copy(update=after), engine).deliver_once()

    in_overlap, past_overlap = receiver.requests
    assert verifies(new, in_overlap) and verifies(old, in_overlap)
    assert verifies(new, past_overlap) and not verifies(old, past_overlap)


def test_the_cli_shows_a_tenants_secret_once_and_rotates_it(
    settings: Settings,
    engine: Engine,
) -> None:
    env = {**os.environ, "HEPATO_DATABASE_URL": settings.database_url}

    def hepato(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "hepato", "keys", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def secret_in(out: str) -> str:
        [line] = [line for line in out.splitlines() if line.startswith("webhook secret:")]
        return line.split()[-1]

    created = secret_in(hepato("create", "lab-c"))
    assert created.startswith("whsec_")
    assert "whsec_" not in hepato("create", "lab-c")  # shown once: a second key keeps it
    rotated = secret_in(hepato("rotate-webhook-secret", "lab-c"))
    assert rotated.startswith("whsec_") and rotated != created
    assert "whsec_" not in hepato("list")


# --- where a callback may go ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://10.1.2.3/hook", "private"),
        ("https://192.168.0.7/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://hooks.lab.test/" + "x" * 3000, "longer than"),
    ],
)
def test_a_callback_to_a_private_address_is_refused_at_submission(
    make_client: MakeClient,
    key_of: Callable[[str], str],
    url: str,
    reason: str,
) -> None:
    client = make_client(webhook_secret=SHARED)
    answer = client.post(
        "/v1/jobs", files=one(), data={"callback_url": url}, headers=bearer(key_of("lab-a"))
    )
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "callback_url" in detail and reason in detail, detail
    assert "HEPATO_WEBHOOK_ALLOWED_HOSTS" in detail or reason == "longer than", detail


def test_a_callback_to_the_stacks_own_services_is_refused(
    settings: Settings, resolver: dict[str, list[str]]
) -> None:
    # An object store with a public address, as a cloud one has: a callback there would
    # let a tenant make the worker talk to it.
    stack = settings.model_copy(update={"s3_endpoint": "objects.lab.test:8333"})
    resolver["objects.lab.test"] = [PUBLIC_IP]
    resolver["hooks.lab.test"] = [PUBLIC_IP]
    with pytest.raises(CallbackRefused, match="object store"):
        egress.check("https://hooks.lab.test/hook", stack)
    resolver["hooks.lab.test"] = ["93.184.216.35"]
    assert egress.check("https://hooks.lab.test/hook", stack).address == "93.184.216.35"
    listed = stack.model_copy(update={"webhook_allowed_hosts": ["hooks.lab.test"]})
    resolver["hooks.lab.test"] = [PUBLIC_IP]
    assert egress.check("https://hooks.lab.test/hook", listed).address == PUBLIC_IP


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:9/hook", ["127.0.0.1"]),
        ("http://localhost:9/hook", ["localhost"]),
        ("http://10.1.2.3/hook", ["10.0.0.0/8"]),
        ("http://[::1]:9/hook", ["::1"]),
    ],
)
def test_a_private_callback_is_accepted_when_the_allow_list_names_it(
    make_client: MakeClient,
    key_of: Callable[[str], str],
    url: str,
    allowed: list[str],
) -> None:
    client = make_client(webhook_secret=SHARED, webhook_allowed_hosts=allowed)
    answer = client.post(
        "/v1/jobs", files=one(), data={"callback_url": url}, headers=bearer(key_of("lab-a"))
    )
    assert answer.status_code == 202, answer.text


def test_a_callback_whose_name_now_resolves_to_loopback_is_refused_at_delivery(
    make_client: MakeClient,
    key_of: Callable[[str], str],
    settings: Settings,
    engine: Engine,
    models: dict[str, Model],
    receiver: Receiver,
    resolver: dict[str, list[str]],
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://hooks.lab.test:{port}/hook"
    resolver["hooks.lab.test"] = [PUBLIC_IP]
    client = make_client(webhook_secret=SHARED)
    answer = client.post(
        "/v1/jobs", files=one(), data={"callback_url": url}, headers=bearer(key_of("lab-a"))
    )
    assert answer.status_code == 202, answer.text
    Worker(settings, models, burst=True).run(install_signals=False)
    # The name now points at the worker's own loopback, where the receiver listens: a
    # delivery that trusted the first answer would reach it.
    resolver["hooks.lab.test"] = ["127.0.0.1"]
    assert WebhookSender(settings, engine).deliver_once() == 1

    [delivery] = deliveries(engine).values()
    assert (delivery.state, delivery.attempts) == ("failed", 1), delivery.last_error
    assert "loopback" in (delivery.last_error or ""), delivery.last_error
    assert receiver.requests == []
    # Refused for good: nothing is due again.
    assert WebhookSender(settings, engine).deliver_once() == 0
