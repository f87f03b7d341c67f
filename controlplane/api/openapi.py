"""The OpenAPI 3.1 document, made from what each route declares with `operation` and from the
models it names (api/bodies.py, api/views.py); pydantic writes their schemas.

Each route states its contract next to its code; the statuses a body, a query or the token can
add are added here, so they can't be forgotten. A test checks that the document names exactly
the routes the app serves, and the unit tests check every reply against it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from controlplane.api.http import MAX_BODY, MUTATING
from controlplane.api.views import Error

Schema = dict[str, Any]
Ref = Callable[[type[BaseModel], JsonSchemaMode], Schema]
"""The $ref to a model's schema in the document."""
F = TypeVar("F", bound=Callable[..., Any])
ATTRIBUTE = "openapi_operation"
TEXT = "text/plain"

MEANING = {
    400: "malformed JSON",
    401: "the API token is missing or wrong",
    404: "unknown service or backend",
    413: f"body larger than {MAX_BODY // 1024} KiB",
    415: "the body is not application/json",
    422: "a value outside its grammar; the message names what is allowed",
    503: "not ready: the first sync with Docker has not finished",
}
PATH_PARAMETERS = {
    "name": "service name",
    "container": "container name, ID or unambiguous ID prefix (4+ characters)",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    reply: type[BaseModel] | Literal["text/plain"] | None
    """The 200 reply: a model, plain text, or None for a document of its own (OpenAPI)."""
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    """Statuses the route itself answers with an Error; those of the body, query and token
    are added."""
    replies: Mapping[int, tuple[type[BaseModel], str]] = field(default_factory=dict)
    """Other statuses that answer with a model of their own, and what they mean."""


def operation(
    summary: str,
    reply: type[BaseModel] | Literal["text/plain"] | None,
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    replies: Mapping[int, tuple[type[BaseModel], str]] | None = None,
) -> Callable[[F], F]:
    """Declare a route's contract for the document; the route still reads its request itself,
    in its own order (not ready, unknown service, then the query, then the body)."""
    declared = Operation(summary, reply, body, query, errors, replies or {})

    def mark(view: F) -> F:
        setattr(view, ATTRIBUTE, declared)
        return view

    return mark


class _Schemas(GenerateJsonSchema):
    """No generated title on every field: the field's name says it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


@dataclass(frozen=True)
class _Route:
    path: str
    method: str
    arguments: tuple[str, ...]
    operation: Operation


def _routes(app: Flask) -> Iterator[_Route]:
    for rule in app.url_map.iter_rules():
        declared = getattr(app.view_functions[rule.endpoint], ATTRIBUTE, None)
        if declared is None:
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        arguments = tuple(re.findall(r"{([^{}]+)}", path))
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield _Route(path, method, arguments, declared)


def document(app: Flask) -> Schema:
    routes = list(_routes(app))
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for route in routes:
        declared = route.operation
        if declared.body:
            wanted.append((declared.body, "validation"))
        if isinstance(declared.reply, type):
            wanted.append((declared.reply, "serialization"))
        wanted += [(model, "serialization") for model, _ in declared.replies.values()]
    refs, components = models_json_schema(
        list(dict.fromkeys(wanted)),
        ref_template="#/components/schemas/{model}",
        schema_generator=_Schemas,
    )

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> Schema:
        return refs[(model, mode)]

    paths: Schema = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "controlplane",
            "version": "1",
            "description": "Inspect services and switch balancing at run time. Mutating "
            "requests need `Authorization: Bearer <token>` when the controller has a token.",
        },
        "paths": paths,
        "components": {
            "schemas": components.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: _Route, ref: Ref) -> Schema:
    declared = route.operation
    secured = route.method in MUTATING
    errors = {*declared.errors}
    if secured:
        errors.add(401)
    if declared.query:
        errors.add(422)
    if declared.body:
        errors |= {400, 413, 415, 422}
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": PATH_PARAMETERS[name],
        }
        for name in route.arguments
    ]
    if declared.query:
        parameters += _query_parameters(declared.query)
    result: Schema = {"summary": declared.summary}
    if secured:
        result["security"] = [{"bearer": []}]
    if parameters:
        result["parameters"] = parameters
    if declared.body:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(declared.body, "validation")}},
        }
    if declared.reply is None:
        ok: Schema = {"description": declared.summary}
    elif isinstance(declared.reply, str):
        ok = {"description": declared.summary, "content": {TEXT: {"schema": {"type": "string"}}}}
    else:
        ok = _json(ref(declared.reply, "serialization"), declared.summary)
    responses = {"200": ok}
    for status, (model, meaning) in declared.replies.items():
        responses[str(status)] = _json(ref(model, "serialization"), meaning)
    for status in sorted(errors):
        responses[str(status)] = _json(ref(Error, "serialization"), MEANING[status])
    result["responses"] = responses
    return result


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query_parameters(model: type[BaseModel]) -> list[Schema]:
    properties = model.model_json_schema(schema_generator=_Schemas)["properties"]
    parameters = []
    for name, schema in properties.items():
        described = dict(schema)
        description = described.pop("description", None)
        branches = [b for b in described.pop("anyOf", []) if b != {"type": "null"}]
        if branches:
            (branch,) = branches
            described.update(branch)
        if described.get("default") is None:
            described.pop("default", None)
        parameters.append(
            {"name": name, "in": "query", "schema": described, "description": description}
        )
    return parameters
