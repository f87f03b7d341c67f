"""The grammar of operator overrides sent through the API, and how they change the model.

API bodies come from anyone who can reach the API, so they pass the same grammar as labels
(a hash key through `parse_hash_key`, a method through `parse_method`) plus strict JSON types;
a wrong body is refused as a whole, naming the field and what it allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from controlplane.core import labels as L
from controlplane.core.model import Algorithm, BackendOverride, Method, Overrides
from controlplane.errors import InvalidValue

ALGORITHM_FIELDS = ("method", "key", "consistent", "two")
BACKEND_FIELDS = ("weight", "drain")
MIN_WEIGHT, MAX_WEIGHT = 1, 1000
# Docker's own grammar for container names: what a backend override is keyed by.
CONTAINER_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}")


def _object(body: object, fields: tuple[str, ...], example: str) -> Mapping[str, object]:
    if not isinstance(body, dict):
        raise InvalidValue(
            f"the body must be a JSON object such as {example}",
            {"allowed_fields": list(fields)},
        )
    unknown = sorted(k for k in body if k not in fields)
    if unknown:
        raise InvalidValue(
            f"unknown field(s) {', '.join(L.show(str(k)) for k in unknown)}: the fields are "
            f"{', '.join(fields)}",
            {"fields": unknown, "allowed_fields": list(fields)},
        )
    return body


def _flag(body: Mapping[str, object], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidValue(
            f"{name} must be true or false (a JSON boolean), not {L.show(repr(value))}",
            {"field": name, "allowed": [True, False]},
        )
    return value


def parse_algorithm(body: object) -> Algorithm:
    """`{"method", "key", "consistent", "two"}`. Fields that don't apply to the method may be
    sent as null or false (so a GET's `algorithm` can be sent back as it is), never set."""
    fields = _object(body, ALGORITHM_FIELDS, '{"method": "least_conn"}')
    allowed = [m.value for m in Method]
    method_value = fields.get("method")
    if not isinstance(method_value, str):
        raise InvalidValue(
            f"method is required and must be a string: one of {', '.join(allowed)}",
            {"field": "method", "allowed": allowed},
        )
    try:
        method = L.parse_method(method_value, "method")
    except InvalidValue as error:
        raise InvalidValue(str(error), {"field": "method", "allowed": allowed}) from None
    key_value = fields.get("key")
    consistent = _flag(fields, "consistent")
    two = _flag(fields, "two")
    key = None
    if method is Method.HASH:
        if not isinstance(key_value, str):
            raise InvalidValue(
                "method hash needs a key (a string of nginx variables, e.g. $request_uri)",
                {"field": "key"},
            )
        try:
            key = L.parse_hash_key(key_value, "key")
        except InvalidValue as error:
            raise InvalidValue(str(error), {"field": "key"}) from None
    elif key_value not in (None, ""):
        raise InvalidValue(f"key applies only to method hash, not {method.value}", {"field": "key"})
    if consistent and method is not Method.HASH:
        raise InvalidValue(
            f"consistent applies only to method hash, not {method.value}",
            {"field": "consistent"},
        )
    if two and method is not Method.RANDOM:
        raise InvalidValue(
            f"two applies only to method random, not {method.value}", {"field": "two"}
        )
    return Algorithm(method=method, key=key, consistent=consistent, two=two)


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


def parse_backend_patch(body: object) -> BackendPatch:
    fields = _object(body, BACKEND_FIELDS, '{"weight": 5} or {"drain": true}')
    if not fields:
        raise InvalidValue(
            "the body names no field: send weight (1-1000, or null to drop the override) "
            "and/or drain (true or false)",
            {"allowed_fields": list(BACKEND_FIELDS)},
        )
    patch = BackendPatch()
    if "weight" in fields:
        weight = fields["weight"]
        if weight is None:
            patch = replace(patch, clear_weight=True)
        elif (
            isinstance(weight, bool)
            or not isinstance(weight, int)
            or not MIN_WEIGHT <= weight <= MAX_WEIGHT
        ):
            raise InvalidValue(
                f"weight must be a whole number from {MIN_WEIGHT} to {MAX_WEIGHT}, or null, "
                f"not {L.show(repr(weight))}",
                {"field": "weight", "minimum": MIN_WEIGHT, "maximum": MAX_WEIGHT},
            )
        else:
            patch = replace(patch, weight=weight)
    if "drain" in fields:
        if not isinstance(fields["drain"], bool):
            raise InvalidValue(
                f"drain must be true or false, not {L.show(repr(fields['drain']))}",
                {"field": "drain", "allowed": [True, False]},
            )
        patch = replace(patch, drain=fields["drain"])
    return patch


def parse_container_name(value: str) -> str:
    name = value.strip().lstrip("/")
    if not CONTAINER_NAME_RE.fullmatch(name):
        raise InvalidValue(
            f"container {L.show(value)} is not a Docker container name: use letters, digits, "
            "'_', '.' and '-', starting with a letter or digit",
            {"field": "container"},
        )
    return name


def check_algorithm(algorithm: Algorithm) -> Algorithm:
    """An algorithm read back from storage passes the grammar again before it is used."""
    return parse_algorithm(
        {
            "method": algorithm.method.value,
            "key": algorithm.key,
            "consistent": algorithm.consistent,
            "two": algorithm.two,
        }
    )


def check_backend(override: BackendOverride) -> BackendOverride:
    if override.weight is not None and not MIN_WEIGHT <= override.weight <= MAX_WEIGHT:
        raise InvalidValue(f"weight {override.weight} is outside {MIN_WEIGHT}-{MAX_WEIGHT}")
    return override


def for_service(
    overrides: Overrides, service: str
) -> tuple[Algorithm | None, tuple[tuple[str, BackendOverride], ...]]:
    """One service's share of the overrides, hashable, for the builder's memo."""
    backends = overrides.backends.get(service, {})
    return overrides.algorithms.get(service), tuple(sorted(backends.items()))
