"""What clients send: request bodies and query parameters, as pydantic models.

They are the API's contract: the routes read requests through them and the OpenAPI document
is made from them (api/openapi.py). They map onto the core's model, and every value that
reaches nginx passes the core's own grammar inside them (core.labels, core.overrides), never
a weaker check. A refused value becomes an InvalidValue that names the field and says what it
takes, in words made from the same schema the document shows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from controlplane.core import labels as L
from controlplane.core import model as core
from controlplane.core import overrides
from controlplane.errors import InvalidValue

M = TypeVar("M", bound=BaseModel)
REFUSED = "refused"
"""The pydantic error type of a value the core's grammar refused; its message is the core's."""


def _refused(error: InvalidValue) -> PydanticCustomError:
    return PydanticCustomError(
        REFUSED, "{message}", {"message": str(error), "details": error.details}
    )


def _method(value: object) -> object:
    """Any case and spacing, as in labels; anything but a string is left to the type check."""
    if not isinstance(value, str):
        return value
    try:
        return L.parse_method(value, "method")
    except InvalidValue as error:
        raise _refused(error) from None


def _whole(value: object) -> object:
    """JSON, and so the schema, does not tell 5.0 from 5: a whole float is that integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _none_is_false(value: object) -> object:
    return False if value is None else value


def _query_flag(value: object, info: ValidationInfo) -> object:
    """The words labels take for a boolean (true, 1, yes, on and their opposites)."""
    if not isinstance(value, str):
        return value
    try:
        return L.parse_bool(value, info.field_name or "value")
    except InvalidValue as error:
        raise _refused(error) from None


Flag = Annotated[
    StrictBool,
    BeforeValidator(_none_is_false),
    WithJsonSchema({"type": ["boolean", "null"]}, mode="validation"),
]
"""true or false; null reads as false, so the algorithm of a reply can be sent back as it is."""
QueryFlag = Annotated[bool, BeforeValidator(_query_flag)]
UNSET: dict[str, Any] = {"enum": [None, False, ""]}
"""What the core counts as an option not set."""


def _without_default(schema: dict[str, Any]) -> None:
    """For a PATCH field: left out means unchanged, which no default value says."""
    schema.pop("default", None)


def _algorithm_schema(schema: dict[str, Any]) -> None:
    """The core's rules of which option goes with which method (core.overrides.OPTIONS) in
    JSON Schema, so the document states them too."""

    def method_is(method: core.Method) -> dict[str, Any]:
        return {"properties": {"method": {"const": method.value}}, "required": ["method"]}

    keyed = overrides.OPTIONS["key"]
    schema["allOf"] = [
        {
            "if": method_is(keyed),
            "then": {
                "required": ["key"],
                "properties": {"key": {"type": "string", "minLength": 1}},
            },
        },
        *(
            {"if": {"not": method_is(method)}, "then": {"properties": {option: UNSET}}}
            for option, method in overrides.OPTIONS.items()
        ),
    ]
    schema["examples"] = [
        {"method": "least_conn"},
        {"method": "hash", "key": "$request_uri", "consistent": True},
    ]


class Body(BaseModel):
    """A JSON object with exactly these fields; replies hold every field (none is left out)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_serialization_defaults_required=True
    )


class Algorithm(Body):
    """A service's balancing method: the body of PUT .../algorithm and a part of every reply
    that shows a service. Options that don't apply to the method may be left out, null or
    false (as replies show them), never set."""

    model_config = ConfigDict(json_schema_extra=_algorithm_schema)

    method: Annotated[core.Method, BeforeValidator(_method)]
    key: str | None = Field(
        None,
        description="method hash only: the hash key, nginx variables and the characters "
        "A-Z a-z 0-9 _ . : / , = -, e.g. $request_uri",
    )
    consistent: Flag = Field(False, description="method hash only: consistent (ketama) hashing")
    two: Flag = Field(
        False, description="method random only: pick two, send to the less loaded of them"
    )

    @model_validator(mode="after")
    def _rules(self) -> Self:
        try:
            self.to_core()
        except InvalidValue as error:
            raise _refused(error) from None
        return self

    @classmethod
    def of(cls, algorithm: core.Algorithm) -> Algorithm:
        """A core value is valid already: made without checking it again."""
        return cls.model_construct(
            method=algorithm.method,
            key=algorithm.key,
            consistent=algorithm.consistent,
            two=algorithm.two,
        )

    def to_core(self) -> core.Algorithm:
        return overrides.check_algorithm(
            core.Algorithm(self.method, self.key, self.consistent, self.two)
        )


def _health_mode(value: object) -> object:
    """Any case and spacing, as in labels; anything but a string is left to the type check."""
    if not isinstance(value, str):
        return value
    try:
        return L.parse_health(value, "mode")
    except InvalidValue as error:
        raise _refused(error) from None


def _health_schema(schema: dict[str, Any]) -> None:
    """The core's rules of which field goes with which mode (core.overrides.HealthSpec) in
    JSON Schema: none takes no other field, tcp no http field."""

    def mode_is(mode: core.HealthMode) -> dict[str, Any]:
        return {"properties": {"mode": {"const": mode.value}}, "required": ["mode"]}

    def unset(fields: Sequence[str]) -> dict[str, Any]:
        return {"properties": {f: {"type": "null"} for f in fields}}

    others = [f for f in overrides.HEALTH_FIELDS if f != "mode"]
    schema["allOf"] = [
        {"if": mode_is(core.HealthMode.NONE), "then": unset(others)},
        {"if": mode_is(core.HealthMode.TCP), "then": unset(overrides.HTTP_FIELDS)},
    ]
    schema["examples"] = [
        {"mode": "http", "path": "/healthz", "interval": "2s", "fails": 3, "passes": 2},
        {"mode": "tcp", "interval": "10s"},
        {"mode": "none"},
    ]


def _threshold(description: str) -> Any:
    return Field(None, strict=True, ge=L.THRESHOLD[0], le=L.THRESHOLD[1], description=description)


Count = Annotated[int | None, BeforeValidator(_whole)]


class HealthCheck(Body):
    """A service's health check: the body of PUT .../health, and the override a reply shows.
    A field left out or null takes its default (as HealthCheck's in the core: tcp, /, the
    backend's port, 200-399, 5s, 1s, 3, 2, 60s); a path, host or status without a mode means
    http. Every value passes the grammar of its controlplane.health.* label."""

    model_config = ConfigDict(json_schema_extra=_health_schema)

    mode: Annotated[core.HealthMode | None, BeforeValidator(_health_mode)] = Field(
        None,
        description="tcp: a connect to the port; http: a GET whose status must be in range; "
        "none: not checked, served as soon as it runs (takes no other field)",
    )
    path: str | None = Field(
        None, description="http only: the path to GET, printable, no space (default /)"
    )
    port: Annotated[int | None, BeforeValidator(_whole)] = Field(
        None,
        strict=True,
        ge=overrides.PORTS[0],
        le=overrides.PORTS[1],
        description="the port to check (default: the backend's own)",
    )
    host: str | None = Field(
        None,
        description="http only: the Host header, a DNS name or IPv4 address with an optional "
        ":port (default: the backend's address)",
    )
    status: str | None = Field(
        None, description="http only: the statuses that pass, NNN or LOW-HIGH (default 200-399)"
    )
    interval: str | None = Field(
        None,
        description="how often each backend is checked, in ms, s or m (e.g. 500ms, 5s), "
        "from 100ms to 1h (default 5s)",
    )
    timeout: str | None = Field(
        None, description="how long a probe may take, from 10ms to 60s (default 1s)"
    )
    fails: Count = _threshold("failures in a row that take a backend out (default 3)")
    passes: Count = _threshold("passes in a row that bring it back (default 2)")
    start_period: str | None = Field(
        None,
        description="how long a new backend has to pass its first check, in s, m or h, from "
        "1s to 1h (default 60s)",
    )

    @model_validator(mode="after")
    def _rules(self) -> Self:
        try:
            self.to_core()
        except InvalidValue as error:
            raise _refused(error) from None
        return self

    @classmethod
    def of(cls, check: core.HealthCheck) -> HealthCheck:
        """A core value is valid already: made without checking it again."""
        spec = overrides.HealthSpec.of(check)
        fields: dict[str, Any] = {f: getattr(spec, f) for f in overrides.HEALTH_FIELDS}
        return cls.model_construct(**{**fields, "mode": check.mode})

    def to_core(self) -> core.HealthCheck:
        fields = {f: getattr(self, f) for f in overrides.HEALTH_FIELDS}
        fields["mode"] = self.mode.value if self.mode is not None else None
        return overrides.HealthSpec(**fields).to_check()


class BackendPatch(Body):
    """The body of PATCH .../backends/{container}: a field left out stays as it is."""

    model_config = ConfigDict(
        json_schema_extra={"minProperties": 1, "examples": [{"weight": 5}, {"drain": True}]}
    )

    weight: Annotated[int | None, BeforeValidator(_whole)] = Field(
        None,
        strict=True,
        ge=overrides.MIN_WEIGHT,
        le=overrides.MAX_WEIGHT,
        description="null drops the override: the label decides again",
        json_schema_extra=_without_default,
    )
    drain: StrictBool = Field(
        False,
        description="true: no new requests, and out of DNS, until false again",
        json_schema_extra=_without_default,
    )

    @model_validator(mode="after")
    def _names_a_field(self) -> Self:
        if not self.model_fields_set:
            raise PydanticCustomError(
                REFUSED,
                "the body names no field: send weight ({low}-{high}, or null to drop the "
                "override) and/or drain (true or false)",
                {
                    "low": overrides.MIN_WEIGHT,
                    "high": overrides.MAX_WEIGHT,
                    "details": {"allowed_fields": list(type(self).model_fields)},
                },
            )
        return self

    def to_core(self) -> overrides.BackendPatch:
        sent = self.model_fields_set
        return overrides.BackendPatch(
            weight=self.weight,
            clear_weight="weight" in sent and self.weight is None,
            drain=self.drain if "drain" in sent else None,
        )


class Query(BaseModel):
    """Query parameters; ones the API does not know are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ConfigQuery(Query):
    nginx: str | None = Field(
        None,
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$",
        description="a managed nginx's container name or id: the config that nginx is given "
        "(a dynamic one's has no backend: they are pushed); without it, the reload data "
        "plane's config",
    )


class TimeoutQuery(Query):
    timeout: float | None = Field(
        None,
        ge=0.1,
        le=60,
        allow_inf_nan=False,
        description="seconds to wait (default: the controller's --wait-timeout, 10)",
    )


class ZoneQuery(Query):
    after: int = Field(
        -1, ge=-1, le=2**63, description="the zone version the caller has (-1: none)"
    )
    timeout: float = Field(
        25, ge=0, le=30, allow_inf_nan=False, description="seconds to wait for another one"
    )


class WaitQuery(TimeoutQuery):
    wait: QueryFlag = Field(
        False,
        description="answer only after every managed nginx reloaded (or failed), or the timeout",
    )


class ChangeQuery(WaitQuery):
    create: QueryFlag = Field(
        False,
        description="keep the override even though the service or backend does not exist yet",
    )


def _limit(value: object) -> object:
    """Digits only, as every count labels and queries take: not '+5' or '1_0'."""
    if not isinstance(value, str):
        return value
    try:
        return L.parse_int(value, "limit", 1, 500)
    except InvalidValue as error:
        raise _refused(error) from None


class EventsQuery(Query):
    limit: Annotated[int, BeforeValidator(_limit)] = Field(
        100, ge=1, le=500, description="how many, newest first"
    )


def parse(model: type[M], body: object) -> M:
    """`body` read as `model`, or InvalidValue for the first thing wrong with it."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _invalid_body(model, error.errors(include_url=False)) from None


def parse_query(model: type[M], args: Mapping[str, str]) -> M:
    """The query read as `model`, or InvalidValue naming the parameter (details.parameter)."""
    try:
        return model.model_validate(args)
    except ValidationError as error:
        found = error.errors(include_url=False)[0]
        name = str(found["loc"][0])
        if found["type"] == REFUSED:
            message = found["msg"]
        else:
            allowed = _allowed(model.model_json_schema(), name, query=True)
            message = f"{name}={L.show(str(found['input']))} must be {allowed}"
        raise InvalidValue(message, {"parameter": name}) from None


def _invalid_body(model: type[BaseModel], errors: Sequence[ErrorDetails]) -> InvalidValue:
    """Unknown fields first (as a whole), then the first wrong field, worded from the schema."""
    fields = list(model.model_fields)
    schema = model.model_json_schema()
    first = errors[0]
    if first["type"] in ("model_type", "model_attributes_type"):
        examples = " or ".join(json.dumps(e) for e in schema.get("examples", []))
        return InvalidValue(
            f"the body must be a JSON object such as {examples}", {"allowed_fields": fields}
        )
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return InvalidValue(
            f"unknown field(s) {', '.join(L.show(k) for k in unknown)}: the fields are "
            f"{', '.join(fields)}",
            {"fields": unknown, "allowed_fields": fields},
        )
    details: dict[str, object] = {"field": str(first["loc"][0])} if first["loc"] else {}
    if first["type"] == REFUSED:
        return InvalidValue(first["msg"], {**details, **first.get("ctx", {})["details"]})
    field = str(first["loc"][0])
    allowed = _allowed(schema, field)
    if first["type"] == "missing":
        return InvalidValue(f"{field} is required: {allowed}", details)
    shown = json.dumps(first["input"])
    shown = shown if len(shown) <= 80 else shown[:80] + "..."
    return InvalidValue(f"{field} must be {allowed}, not {shown}", details)


def _allowed(schema: Mapping[str, Any], field: str, query: bool = False) -> str:
    """What the document's schema lets a field take, in words."""
    found = schema["properties"][field]
    words: list[str] = []
    for option in found.get("anyOf", [found]):
        if "$ref" in option:
            option = schema["$defs"][option["$ref"].rsplit("/", 1)[-1]]
        kinds = option.get("type", [])
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            if "enum" in option:
                words.append("one of " + ", ".join(str(v) for v in option["enum"]))
            elif kind == "boolean":
                words += ["true", "false"]
            elif kind in ("integer", "number"):
                words.append(
                    ("a whole number" if kind == "integer" else "a number")
                    + (f" from {option['minimum']}" if "minimum" in option else "")
                    + (f" to {option['maximum']}" if "maximum" in option else "")
                )
            elif kind == "string":
                words.append("a string")
            elif kind == "null" and not query:
                words.append("null")
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} or {words[-1]}"
