"""The OpenAPI 3.1 document of the API. Kept next to the routes; a test checks that both
name the same paths and methods, and that replies match these schemas."""

from __future__ import annotations

from typing import Any

from controlplane.core.model import BackendState, Method

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


STRING: Schema = {"type": "string"}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}
BOOLEAN: Schema = {"type": "boolean"}
INTEGER: Schema = {"type": "integer"}
STRINGS: Schema = {"type": "array", "items": STRING}

SCHEMAS: dict[str, Schema] = {
    "Error": _object(
        {"error": _object({"code": STRING, "message": STRING, "details": {"type": "object"}})}
    ),
    "Algorithm": _object(
        {
            "method": {"enum": [m.value for m in Method]},
            "key": {
                **NULLABLE_STRING,
                "description": "method hash only: nginx variables, e.g. $request_uri",
            },
            "consistent": {**BOOLEAN, "description": "method hash only: ketama hashing"},
            "two": {**BOOLEAN, "description": "method random only: random two least_conn"},
        }
    ),
    "AlgorithmRequest": {
        **_object(
            {
                "method": {"enum": [m.value for m in Method]},
                "key": NULLABLE_STRING,
                "consistent": {"type": ["boolean", "null"]},
                "two": {"type": ["boolean", "null"]},
            },
            ["method"],
        ),
        "additionalProperties": False,
    },
    "BackendPatch": {
        **_object(
            {
                "weight": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
                "drain": BOOLEAN,
            },
            [],
        ),
        "additionalProperties": False,
        "minProperties": 1,
    },
    "Backend": _object(
        {
            "container": {**STRING, "description": "container ID"},
            "name": {**STRING, "description": "container name"},
            "network": STRING,
            "ip": STRING,
            "port": INTEGER,
            "weight": INTEGER,
            "backup": BOOLEAN,
            "state": {"enum": [s.value for s in BackendState]},
            "in_nginx": {
                "type": ["boolean", "null"],
                "description": "every managed nginx runs a config that sends it requests "
                "(null: not known yet, or no managed nginx)",
            },
            "served_by": {**STRINGS, "description": "the nginx whose running config does"},
        }
    ),
    "Failure": {
        "anyOf": [
            {"type": "null"},
            _object(
                {
                    "version": {**INTEGER, "description": "of the config that did not take"},
                    "error": STRING,
                    "refused": {**BOOLEAN, "description": "nginx -t said no"},
                    "attempts": INTEGER,
                }
            ),
        ]
    },
    "ServiceNginx": _object(
        {
            "name": STRING,
            "container": STRING,
            "version": {
                "type": ["integer", "null"],
                "description": "of the config it runs (null: not deployed to yet)",
            },
            "in_sync": {
                "type": ["boolean", "null"],
                "description": "it sends this service's requests where the controller wants",
            },
            "serving": {"type": ["integer", "null"]},
            "failure": _ref("Failure"),
        }
    ),
    "Exclusion": _object(
        {"container": STRING, "service": NULLABLE_STRING, "reason": STRING},
    ),
    "Problems": _object(
        {
            "version": INTEGER,
            "excluded": {"type": "array", "items": _ref("Exclusion")},
            "warnings": {
                "type": "array",
                "items": _object({"service": NULLABLE_STRING, "warning": STRING}),
            },
            "nginx": {
                "type": "array",
                "items": _object({"name": STRING, "container": STRING, "failure": _ref("Failure")}),
            },
        }
    ),
    "Overrides": _object(
        {
            "algorithm": {"anyOf": [_ref("Algorithm"), {"type": "null"}]},
            "backends": {
                "type": "object",
                "additionalProperties": _object(
                    {"weight": {"type": ["integer", "null"]}, "drain": BOOLEAN}
                ),
            },
        }
    ),
    "Service": _object(
        {
            "name": STRING,
            "exists": {**BOOLEAN, "description": "false: only overrides (?create=true) so far"},
            "networks": STRINGS,
            "algorithm": _ref("Algorithm"),
            "algorithm_source": {"enum": ["override", "label", "default"]},
            "hosts": STRINGS,
            "backends": {"type": "array", "items": _ref("Backend")},
            "nginx": {"type": "array", "items": _ref("ServiceNginx")},
            "excluded": {
                "type": "array",
                "items": _object({"container": STRING, "reason": STRING}),
            },
            "warnings": STRINGS,
            "overrides": _ref("Overrides"),
        }
    ),
    "Applied": _object(
        {
            "version": INTEGER,
            "done": {**BOOLEAN, "description": "the pass finished its deploys"},
            "reloaded": {**STRINGS, "description": "nginx containers that loaded the change"},
            "errors": STRINGS,
        }
    ),
    "ServiceChange": {
        "allOf": [_ref("Service"), _object({"applied": _ref("Applied")})],
    },
    "ServiceList": _object({"services": {"type": "array", "items": _ref("Service")}}),
    "Nginx": _object(
        {
            "container": STRING,
            "name": STRING,
            "config_path": STRING,
            "networks": STRINGS,
            "started_at": STRING,
            "checksum": NULLABLE_STRING,
            "current": BOOLEAN,
            "last_attempt": NULLABLE_STRING,
            "last_result": {"enum": ["ok", "failed", None]},
            "last_reload": NULLABLE_STRING,
            "last_error": NULLABLE_STRING,
            "reloads": INTEGER,
            "failures": INTEGER,
            "version": {"type": ["integer", "null"]},
            "failure": _ref("Failure"),
        }
    ),
    "NginxList": _object(
        {
            "checksum": STRING,
            "nginx": {"type": "array", "items": _ref("Nginx")},
            "excluded": {
                "type": "array",
                "items": _object({"container": STRING, "reason": STRING}),
            },
        }
    ),
    "Events": _object(
        {
            "events": {
                "type": "array",
                "items": _object(
                    {
                        "time": STRING,
                        "kind": {"enum": ["reconcile", "held", "refused", "failure", "override"]},
                        "summary": STRING,
                        "details": {"type": "object"},
                    }
                ),
            }
        }
    ),
    "DnsRecords": _object(
        {
            "domain": STRING,
            "version": INTEGER,
            "ttl": INTEGER,
            "records": {
                "type": "array",
                "items": _object({"name": STRING, "type": STRING, "ttl": INTEGER, "value": STRING}),
            },
        }
    ),
    "Resync": {"allOf": [_ref("Applied"), _object({"changed": BOOLEAN})]},
    "Health": _object({"status": {"const": "ok"}}),
    "Ready": _object({"ready": BOOLEAN, "reasons": STRINGS}),
}


def _json(schema: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*codes: int) -> dict[str, Schema]:
    meaning = {
        400: "malformed JSON",
        401: "the API token is missing or wrong",
        404: "unknown service or backend",
        413: "body larger than 64 KiB",
        415: "the body is not application/json",
        422: "a value outside its grammar; the message names what is allowed",
        503: "not ready: the first sync with Docker has not finished",
    }
    return {str(code): _json("Error", meaning[code]) for code in codes}


NAME = {"name": "name", "in": "path", "required": True, "schema": STRING}
CONTAINER = {
    "name": "container",
    "in": "path",
    "required": True,
    "schema": STRING,
    "description": "container name, ID or unambiguous ID prefix (4+ characters)",
}
WAIT = {
    "name": "wait",
    "in": "query",
    "schema": BOOLEAN,
    "description": "answer only after every managed nginx reloaded (or failed) or the timeout",
}
TIMEOUT = {
    "name": "timeout",
    "in": "query",
    "schema": {"type": "number", "minimum": 0.1, "maximum": 60},
    "description": "seconds to wait (default 10)",
}
CREATE = {
    "name": "create",
    "in": "query",
    "schema": BOOLEAN,
    "description": "keep the override even though the service or backend does not exist yet",
}
MUTATION_ERRORS = _errors(400, 401, 404, 413, 415, 422, 503)
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _change(summary: str, body: str | None, create: bool = True) -> Schema:
    operation: Schema = {
        "summary": summary,
        "security": BEARER,
        "parameters": [WAIT, TIMEOUT, *([CREATE] if create else [])],
        "responses": {
            "200": _json("ServiceChange", "saved; the service as the pass that applies it sees it"),
            **MUTATION_ERRORS,
        },
    }
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _get(schema: str, summary: str, *errors: int) -> Schema:
    return {"summary": summary, "responses": {"200": _json(schema, summary), **_errors(*errors)}}


PATHS: dict[str, Schema] = {
    "/api/v1/services": {"get": _get("ServiceList", "every service", 503)},
    "/api/v1/services/{name}": {
        "parameters": [NAME],
        "get": _get("Service", "one service", 404, 503),
    },
    "/api/v1/services/{name}/algorithm": {
        "parameters": [NAME],
        "put": _change("set the balancing method (persisted)", "AlgorithmRequest"),
        "delete": _change("remove the method override", None, create=False),
    },
    "/api/v1/services/{name}/backends/{container}": {
        "parameters": [NAME, CONTAINER],
        "patch": _change("set a backend's weight or drain it (persisted)", "BackendPatch"),
        "delete": _change("remove a backend's overrides", None, create=False),
    },
    "/api/v1/config": {
        "get": {
            "summary": "the rendered nginx config",
            "responses": {
                "200": {"description": "config", "content": {"text/plain": {"schema": STRING}}},
                **_errors(503),
            },
        }
    },
    "/api/v1/nginx": {"get": _get("NginxList", "managed nginx containers", 503)},
    "/api/v1/problems": {
        "get": _get("Problems", "every exclusion, warning and nginx that refused", 503)
    },
    "/api/v1/events": {
        "get": {
            **_get("Events", "passes, held scale-outs, failures and overrides, newest first", 422),
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 500}}
            ],
        }
    },
    "/api/v1/dns/records": {"get": _get("DnsRecords", "the DNS zone served", 503)},
    "/api/v1/resync": {
        "post": {
            "summary": "re-inspect every container and apply",
            "security": BEARER,
            "parameters": [TIMEOUT],
            "responses": {"200": _json("Resync", "the pass"), **_errors(401, 422)},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "this document",
            "responses": {"200": {"description": "OpenAPI 3.1"}},
        }
    },
    "/healthz": {"get": _get("Health", "liveness")},
    "/readyz": {
        "get": {
            "summary": "readiness: Docker reachable and first sync done",
            "responses": {
                "200": _json("Ready", "ready"),
                "503": _json("Ready", "not ready; reasons say why"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "text format", "content": {"text/plain": {"schema": STRING}}}
            },
        }
    },
}


def document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "controlplane",
            "version": "1",
            "description": "Inspect services and switch balancing at run time. Mutating "
            "requests need `Authorization: Bearer <token>` when the controller has a token.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
