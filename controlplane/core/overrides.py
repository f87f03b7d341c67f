"""The rules of operator overrides, and how they change the model.

Overrides come from anyone who can reach the API, and back from the state file, so they pass
the same grammar as labels (a hash key through `parse_hash_key`) and the rules of which option
goes with which method, here, whatever reads them (the API's models call these).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from controlplane.core import labels as L
from controlplane.core.model import Algorithm, BackendOverride, HealthCheck, Method, Overrides
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
