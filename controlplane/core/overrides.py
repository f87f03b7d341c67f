"""The rules of operator overrides, and how they change the model.

Overrides come from anyone who can reach the API, and back from the state file, so they pass
the same grammar as labels (a hash key through `parse_hash_key`, a health check's fields through
the `controlplane.health.*` labels' parsers) and the rules of which option goes with which
method or check mode, here, whatever reads them (the API's models call these).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from controlplane.core import labels as L
from controlplane.core.model import (
    Algorithm,
    BackendOverride,
    HealthCheck,
    HealthMode,
    Method,
    Overrides,
)
from controlplane.errors import InvalidValue

OPTIONS: Mapping[str, Method] = MappingProxyType(
    {"key": Method.HASH, "consistent": Method.HASH, "two": Method.RANDOM}
)
"""The method each option of an algorithm belongs to: set with any other, it is refused.
The key is also required with its method."""
MIN_WEIGHT, MAX_WEIGHT = 1, 1000
# Docker's own grammar for container names: what a backend override is keyed by.
CONTAINER_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}")


def check_algorithm(algorithm: Algorithm) -> Algorithm:
    """`algorithm` with its key in the grammar's form, or InvalidValue naming the option that
    breaks a rule. Options that don't apply may be empty or false (as a GET shows them)."""
    keyed = OPTIONS["key"]
    if algorithm.method is keyed:
        if not algorithm.key:
            raise InvalidValue(
                f"method {keyed.value} needs a key (a string of nginx variables, e.g. "
                "$request_uri)",
                {"field": "key"},
            )
        try:
            algorithm = Algorithm(
                algorithm.method,
                L.parse_hash_key(algorithm.key, "key"),
                algorithm.consistent,
                algorithm.two,
            )
        except InvalidValue as error:
            raise InvalidValue(str(error), {"field": "key"}) from None
    for option, method in OPTIONS.items():
        if getattr(algorithm, option) and algorithm.method is not method:
            raise InvalidValue(
                f"{option} applies only to method {method.value}, not {algorithm.method.value}",
                {"field": option},
            )
    return Algorithm(algorithm.method, algorithm.key or None, algorithm.consistent, algorithm.two)


@dataclass(frozen=True)
class BackendPatch:
    """Fields absent from a PATCH stay as they are; `clear_weight` is `"weight": null`."""

    weight: int | None = None
    clear_weight: bool = False
    drain: bool | None = None

    def apply(self, current: BackendOverride) -> BackendOverride:
        weight = None if self.clear_weight else (self.weight or current.weight)
        drain = current.drain if self.drain is None else self.drain
        return BackendOverride(weight=weight, drain=drain)


def parse_container_name(value: str) -> str:
    name = value.strip().lstrip("/")
    if not CONTAINER_NAME_RE.fullmatch(name):
        raise InvalidValue(
            f"container {L.show(value)} is not a Docker container name: use letters, digits, "
            "'_', '.' and '-', starting with a letter or digit",
            {"field": "container"},
        )
    return name


def check_backend(override: BackendOverride) -> BackendOverride:
    if override.weight is not None and not MIN_WEIGHT <= override.weight <= MAX_WEIGHT:
        raise InvalidValue(f"weight {override.weight} is outside {MIN_WEIGHT}-{MAX_WEIGHT}")
    return override


@dataclass(frozen=True)
class HealthSpec:
    """A health check as the API reads and shows it: each field as its label writes it
    (durations such as 5s or 500ms, the status as 200-399), None where it is not given (the
    default applies) or, as shown, where its mode does not use it."""

    mode: str | None = None
    path: str | None = None
    port: int | None = None
    host: str | None = None
    status: str | None = None
    interval: str | None = None
    timeout: str | None = None
    fails: int | None = None
    passes: int | None = None
    start_period: str | None = None

    @classmethod
    def of(cls, check: HealthCheck) -> HealthSpec:
        if check.mode is HealthMode.NONE:
            return cls(mode=check.mode.value)
        http = check.mode is HealthMode.HTTP
        low, high = check.status
        return cls(
            mode=check.mode.value,
            path=check.path if http else None,
            port=check.port,
            host=check.host if http else None,
            status=(f"{low}" if low == high else f"{low}-{high}") if http else None,
            interval=_milliseconds(check.interval_ms),
            timeout=_milliseconds(check.timeout_ms),
            fails=check.fails,
            passes=check.passes,
            start_period=f"{check.start_period}s",
        )

    def to_check(self) -> HealthCheck:
        """The override these fields make, each through its label's parser; InvalidValue
        names the field. A path, Host or status without a mode means http, as in labels. An
        override is active (checked for as long as a backend runs) unless its mode is none,
        which takes no other field; a tcp one takes no http field."""
        given = [name for name in HEALTH_FIELDS if getattr(self, name) is not None]
        values = {name: _parsed(name, str(getattr(self, name))) for name in given}
        named = values.pop("mode", None)
        implied = HealthMode.HTTP if set(given) & set(HTTP_FIELDS) else HealthMode.TCP
        mode = named if isinstance(named, HealthMode) else implied
        misfit = L.health_misfit(mode, values)
        if misfit is not None:
            raise InvalidValue(misfit[1], {"field": misfit[0]})
        chosen: dict[str, Any] = {_CORE_NAMES.get(k, k): v for k, v in values.items()}
        return dataclasses.replace(
            HealthCheck(mode=mode, active=mode is not HealthMode.NONE), **chosen
        )


PORTS = (1, 65535)
HEALTH_FIELDS: Mapping[str, Callable[[str], object]] = MappingProxyType(
    {
        "mode": lambda v: L.parse_health(v, "mode"),
        "path": lambda v: L.parse_health_path(v, "path"),
        "port": lambda v: L.parse_int(v, "port", *PORTS),
        "host": lambda v: L.parse_health_host(v, "host"),
        "status": lambda v: L.parse_status(v, "status"),
        "interval": lambda v: L.parse_milliseconds(v, "interval", *L.INTERVAL_MS),
        "timeout": lambda v: L.parse_milliseconds(v, "timeout", *L.TIMEOUT_MS),
        "fails": lambda v: L.parse_int(v, "fails", *L.THRESHOLD),
        "passes": lambda v: L.parse_int(v, "passes", *L.THRESHOLD),
        "start_period": lambda v: L.parse_seconds(v, "start_period", 1, L.MAX_START_PERIOD),
    }
)
"""Each field of a check, with its label's parser (the label is controlplane.health.FIELD;
the mode's is controlplane.health)."""
HTTP_FIELDS = L.HEALTH_HTTP_ONLY
"""The fields only an http check uses."""
_CORE_NAMES = MappingProxyType({"interval": "interval_ms", "timeout": "timeout_ms"})
_API_NAMES = MappingProxyType(
    {"interval_ms": "interval", "timeout_ms": "timeout", "active": "mode"}
)


def _parsed(name: str, text: str) -> object:
    try:
        return HEALTH_FIELDS[name](text)
    except InvalidValue as error:
        raise InvalidValue(str(error), {"field": name}) from None


def _milliseconds(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def check_health(check: HealthCheck) -> HealthCheck:
    """`check` if the API could have made it (as the state file gives it back), else
    InvalidValue naming the field: each value passes its label's grammar again."""
    made = HealthSpec.of(check).to_check()
    for field in dataclasses.fields(HealthCheck):
        if getattr(made, field.name) != getattr(check, field.name):
            raise InvalidValue(
                f"health check {field.name}={getattr(check, field.name)!r} does not go with "
                f"mode {check.mode.value}, or is not in its grammar's form",
                {"field": _API_NAMES.get(field.name, field.name)},
            )
    return check


def describe_health(spec: HealthSpec, active: bool) -> str:
    """A check in one line, as the CLI shows it; not `active`: the readiness gate alone."""
    if spec.mode == HealthMode.NONE.value:
        return "none: not checked, served as soon as it runs"
    port = f"port {spec.port}" if spec.port else "its port"
    if spec.mode == HealthMode.HTTP.value:
        host = f" (Host {spec.host})" if spec.host else ""
        what = f"http GET {spec.path}{host} on {port}, status {spec.status}"
    else:
        what = f"tcp connect to {port}"
    if active:
        when = (
            f"every {spec.interval} (timeout {spec.timeout}), out after {spec.fails} failing "
            f"in a row, back after {spec.passes} passing"
        )
    else:
        when = f"until it first passes (timeout {spec.timeout}), not after"
    return f"{what}, {when}; start period {spec.start_period}"


def for_service(
    overrides: Overrides, service: str
) -> tuple[Algorithm | None, tuple[tuple[str, BackendOverride], ...], HealthCheck | None]:
    """One service's share of the overrides, hashable, for the builder's memo."""
    backends = overrides.backends.get(service, {})
    return (
        overrides.algorithms.get(service),
        tuple(sorted(backends.items())),
        overrides.health.get(service),
    )
