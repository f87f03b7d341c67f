"""Fixtures for the unit tests: the core's template, and the API over fakes.

The container/network/state builders live in `tests/unit/builders.py`, not here: parametrize
tables call them at import time, and a conftest module is not meant to be imported.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from werkzeug.test import TestResponse

from controlplane.activity import Activity
from controlplane.api.app import create_app
from controlplane.core.model import ContainerFacts
from controlplane.metrics import Metrics
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import Settings
from controlplane.store import OverrideStore
from controlplane.templating import load_template
from controlplane.wiring import api_context
from tests.unit.builders import container, nginx, state
from tests.unit.fakes import FakeDeployer, FakeEvents, FakeSource


@pytest.fixture(scope="session")
def template() -> jinja2.Template:
    """The shipped nginx template, loaded the way the daemon loads it."""
    return load_template()


@dataclass
class ApiHarness:
    """The API over a real reconciler and loop, with fake Docker and nginx: what a route
    changes goes through the same pass, store and render as in production."""

    source: FakeSource
    deployer: FakeDeployer
    reconciler: Reconciler
    loop: ControlLoop
    store: OverrideStore
    activity: Activity
    metrics: Metrics
    app: Flask
    client: FlaskClient

    def set_state(self, *containers: ContainerFacts) -> None:
        self.source.state = state(*containers)

    def call(self, method: str, path: str, **kwargs: object) -> TestResponse:
        """A request whose reply is checked against the OpenAPI document."""
        response = self.client.open(path, method=method, **kwargs)
        check_reply(self.app, method, path, response)
        return response

    @property
    def config(self) -> str:
        snapshot = self.reconciler.snapshot
        assert snapshot is not None
        return snapshot.config


WEB = (nginx("lb"), container("w1", ip="172.20.0.2"), container("w2", ip="172.20.0.3"))


class HarnessFactory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[tuple[ApiHarness, threading.Thread]] = []

    def __call__(
        self,
        *containers: ContainerFacts,
        token: str | None = None,
        lua: bool = False,
        **settings: object,
    ) -> ApiHarness:
        """`lua`: the nginx take the dynamic data plane's probe (else they are plain)."""
        source = FakeSource(state(*(containers or WEB)))
        deployer = FakeDeployer()
        deployer.lua = lua
        store = OverrideStore(self.directory)
        chosen = replace(Settings(quiet_window=0.01, api_token=token), **settings)  # type: ignore[arg-type]
        reconciler = Reconciler(
            source, deployer, load_template(), chosen, overrides=lambda: store.current
        )
        loop = ControlLoop(reconciler, FakeEvents([]), chosen)
        activity = Activity()
        metrics = Metrics(lambda: reconciler.snapshot, nginx=lambda: reconciler.nginx)
        reconciler.on_report.extend([activity.on_report, metrics.on_report])
        loop.on_failure.extend([activity.on_failure, metrics.on_failure])
        app = create_app(api_context(chosen, reconciler, loop, store, activity, metrics))
        harness = ApiHarness(
            source, deployer, reconciler, loop, store, activity, metrics, app, app.test_client()
        )
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        loop.ready.wait(5)
        self.running.append((harness, thread))
        return harness

    def stop(self) -> None:
        for harness, thread in self.running:
            harness.loop.stop()
            thread.join(timeout=5)
            harness.store.close()
        self.running.clear()


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[HarnessFactory]:
    factory = HarnessFactory(tmp_path / "state")
    yield factory
    factory.stop()


@pytest.fixture
def api(make_api: HarnessFactory) -> ApiHarness:
    """nginx lb and service web with backends w1 and w2, state kept in a temporary directory."""
    return make_api()


def documented(app: Flask, method: str, path: str, status: int) -> dict[str, object] | None:
    """The OpenAPI schema of this reply (None for a non-JSON one); fails when the document
    does not describe the route, method and status."""
    endpoint, _ = app.url_map.bind("localhost").match(path, method)
    rule = next(r for r in app.url_map.iter_rules() if r.endpoint == endpoint)
    template = rule.rule.replace("<", "{").replace(">", "}")
    operation = served_document(app)["paths"][template][method.lower()]
    reply = operation["responses"].get(str(status))
    assert reply is not None, f"{method} {template} does not document status {status}"
    content = reply.get("content", {}).get("application/json")
    return content["schema"] if content else None


def served_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI document as the app serves it (made once per app)."""
    found: dict[str, Any] = app.test_client().get("/api/v1/openapi.json").get_json()
    return found


def check_reply(app: Flask, method: str, path: str, response: TestResponse) -> None:
    schema = documented(app, method, path.split("?")[0], response.status_code)
    if schema is not None:
        components = served_document(app)["components"]
        validator = Draft202012Validator({**schema, "components": components})
        errors = sorted(validator.iter_errors(response.get_json()), key=str)
        assert not errors, f"{method} {path} -> {response.status_code}: {errors[0].message}"
