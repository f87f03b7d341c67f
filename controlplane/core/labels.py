"""The grammar of every value that may reach an nginx config.

Labels come from whoever can start a container, so each value is checked against a strict
pattern before it is used; a value that fails is reported, never passed through.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from controlplane.core.model import Algorithm, DataPlane, HealthMode, Method, SwarmEndpoint
from controlplane.errors import InvalidValue

PREFIX = "controlplane."
ROLE = PREFIX + "role"
ENABLE = PREFIX + "enable"
SERVICE = PREFIX + "service"
PORT = PREFIX + "port"
WEIGHT = PREFIX + "weight"
BACKUP = PREFIX + "backup"
MAX_FAILS = PREFIX + "max_fails"
FAIL_TIMEOUT = PREFIX + "fail_timeout"
MAX_CONNS = PREFIX + "max_conns"
ALGORITHM = PREFIX + "algorithm"
HASH_KEY = PREFIX + "hash_key"
HASH_CONSISTENT = PREFIX + "hash_consistent"
RANDOM_TWO = PREFIX + "random_two"
HOSTS = PREFIX + "hosts"
CONFIG_PATH = PREFIX + "config_path"
DATAPLANE = PREFIX + "dataplane"
ENDPOINT = PREFIX + "endpoint"
HEALTH = PREFIX + "health"
HEALTH_START_PERIOD = PREFIX + "health.start_period"
HEALTH_PATH = PREFIX + "health.path"
HEALTH_PORT = PREFIX + "health.port"
HEALTH_HOST = PREFIX + "health.host"
HEALTH_STATUS = PREFIX + "health.status"
HEALTH_INTERVAL = PREFIX + "health.interval"
HEALTH_TIMEOUT = PREFIX + "health.timeout"
HEALTH_FAILS = PREFIX + "health.fails"
HEALTH_PASSES = PREFIX + "health.passes"

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

# Labels under this prefix belong to controlplane's own test harness, not to users.
TEST_PREFIX = PREFIX + "test"
KNOWN_LABELS = frozenset(
    {
        ROLE,
        ENABLE,
        SERVICE,
        PORT,
        WEIGHT,
        BACKUP,
        MAX_FAILS,
        FAIL_TIMEOUT,
        MAX_CONNS,
        ALGORITHM,
        HASH_KEY,
        HASH_CONSISTENT,
        RANDOM_TWO,
        HOSTS,
        CONFIG_PATH,
        DATAPLANE,
        ENDPOINT,
        HEALTH,
        HEALTH_START_PERIOD,
        HEALTH_PATH,
        HEALTH_PORT,
        HEALTH_HOST,
        HEALTH_STATUS,
        HEALTH_INTERVAL,
        HEALTH_TIMEOUT,
        HEALTH_FAILS,
        HEALTH_PASSES,
    }
)

# Dot-separated labels, none empty and none starting or ending with '-' or '_': every
# service name is also a host name nginx must accept in server_name.
NAME_RE = re.compile(
    r"(?=.{1,63}$)[a-z0-9]([a-z0-9_-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]*[a-z0-9])?)*"
)
HOST_RE = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
DURATION_RE = re.compile(r"([0-9]{1,6})(s|m|h)?")
MS_DURATION_RE = re.compile(r"([0-9]{1,7})(ms|s|m)?")
# An HTTP request target the controller writes itself: printable ASCII, no space (so no
# header can be smuggled into the request line).
HEALTH_PATH_RE = re.compile(r"/[\x21-\x7e]{0,255}")
STATUS_RE = re.compile(r"([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?")
CONFIG_PATH_RE = re.compile(r"/([A-Za-z0-9_.-]+/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*\.conf")
# nginx reads a variable name as far as [A-Za-z0-9_] goes, so the token must too.
HASH_TOKEN_RE = re.compile(r"\$([A-Za-z0-9_]*)|([A-Za-z0-9_.:/,=-]+)")

HASH_VARIABLES = frozenset(
    {
        "args",
        "binary_remote_addr",
        "document_uri",
        "host",
        "http_host",
        "query_string",
        "remote_addr",
        "remote_user",
        "request_method",
        "request_uri",
        "scheme",
        "server_name",
        "uri",
    }
)
HASH_PREFIX_VARIABLE_RE = re.compile(r"(http|cookie|arg)_[A-Za-z0-9_]+")

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
MAX_DURATION_SECONDS = 86_400
MAX_START_PERIOD = 3600
INTERVAL_MS = (100, 3_600_000)
TIMEOUT_MS = (10, 60_000)
THRESHOLD = (1, 100)


def show(value: str) -> str:
    """Quote a rejected value for a message, escaping anything unprintable."""
    return repr(value[:80] + ("..." if len(value) > 80 else ""))


def parse_name(value: str, what: str) -> str:
    name = value.strip().lower()
    if not NAME_RE.fullmatch(name):
        raise InvalidValue(
            f"{what} {show(value)} is not a valid name: use 1-63 characters from a-z, 0-9, "
            "'_', '.', '-', starting and ending with a letter or digit, with no '..'"
        )
    return name


NETWORK_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


def parse_network(value: str) -> str:
    """Docker's own grammar for network names, case kept (they are case-sensitive)."""
    name = value.strip()
    if not NETWORK_RE.fullmatch(name):
        raise InvalidValue(
            f"network {show(value)} is not a Docker network name: use letters, digits, '_', '.' "
            "and '-', starting with a letter or digit"
        )
    return name


def parse_bool(value: str, label: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidValue(f"{label}={show(value)} is not a boolean: use true or false")


def parse_int(value: str, label: str, low: int, high: int) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 7 or not low <= int(text) <= high:
        raise InvalidValue(f"{label}={show(value)} must be a whole number from {low} to {high}")
    return int(text)


def parse_duration(value: str, label: str) -> str:
    """nginx's whole-second time syntax, bounded to a day so a typo can't disable failure
    handling."""
    text = value.strip()
    match = DURATION_RE.fullmatch(text)
    factor = {"s": 1, None: 1, "m": 60, "h": 3600}
    if not match or int(match.group(1)) * factor[match.group(2)] > MAX_DURATION_SECONDS:
        raise InvalidValue(
            f"{label}={show(value)} is not a duration: use whole seconds, minutes or hours "
            "(e.g. 10s, 2m), at most 24h"
        )
    return text


def parse_seconds(value: str, label: str, low: int, high: int) -> int:
    """The duration grammar above, as seconds from `low` to `high`."""
    text = value.strip()
    match = DURATION_RE.fullmatch(text)
    factor = {"s": 1, None: 1, "m": 60, "h": 3600}
    seconds = int(match.group(1)) * factor[match.group(2)] if match else -1
    if not low <= seconds <= high:
        raise InvalidValue(
            f"{label}={show(value)} is not a duration from {low}s to {high}s: use whole "
            "seconds, minutes or hours (e.g. 30s, 2m)"
        )
    return seconds


def parse_health(value: str, what: str = HEALTH) -> HealthMode:
    try:
        return HealthMode(value.strip().lower())
    except ValueError:
        raise InvalidValue(
            f"{what}={show(value)} is not a check: use tcp (a connect to the port), http "
            f"(a GET of {HEALTH_PATH}, / by default) or none (no check: served at once)"
        ) from None


HEALTH_HTTP_ONLY = ("path", "host", "status")
"""The check fields only an http check uses (as the API names them; the label of each is
controlplane.health.FIELD)."""


def health_misfit(
    mode: HealthMode | None,
    given: Iterable[str],
    field_is: Callable[[str], str] = lambda field: field,
    mode_is: Callable[[str], str] = lambda mode: f"mode {mode}",
) -> tuple[str, str] | None:
    """The first of the `given` check fields (the API's names: path, port, ..., start_period)
    that `mode` does not use, and why; None when all go with it. The one rule labels and the
    API share: none checks nothing, so it takes no other field; tcp takes no http field; no
    mode: the fields choose it. `field_is` and `mode_is` write a field and a mode as the
    caller's user does (labels: controlplane.health.path, controlplane.health=tcp)."""
    for field in given:
        if mode is HealthMode.NONE:
            return field, (
                f"{mode_is('none')} checks nothing, so {field_is(field)} does not apply: leave "
                f"it out, or choose {mode_is('tcp')} or http"
            )
        if mode is HealthMode.TCP and field in HEALTH_HTTP_ONLY:
            return field, (
                f"{field_is(field)} applies only to {mode_is('http')}, not tcp: leave it out, "
                f"or choose {mode_is('http')}"
            )
    return None


def parse_milliseconds(value: str, what: str, low: int, high: int) -> int:
    """A duration in ms, s (the default unit) or m, as milliseconds from `low` to `high`."""
    text = value.strip()
    match = MS_DURATION_RE.fullmatch(text)
    factor = {"ms": 1, "s": 1000, None: 1000, "m": 60_000}
    ms = int(match.group(1)) * factor[match.group(2)] if match else -1
    if not low <= ms <= high:
        raise InvalidValue(
            f"{what}={show(value)} is not a duration from {low / 1000:g}s to {high / 1000:g}s: "
            "use whole milliseconds, seconds or minutes (e.g. 500ms, 5s, 1m)"
        )
    return ms


def parse_health_path(value: str, what: str = HEALTH_PATH) -> str:
    path = value.strip()
    if not HEALTH_PATH_RE.fullmatch(path):
        raise InvalidValue(
            f"{what}={show(value)} is not a path: use an absolute path of at most 256 "
            "printable characters without spaces (e.g. /healthz)"
        )
    return path


def parse_health_host(value: str, what: str = HEALTH_HOST) -> str:
    """A Host header: a DNS name (no wildcard) or IPv4 address, with an optional port."""
    host, _, port = value.strip().lower().partition(":")
    if (
        not host
        or len(host) > 253
        or host.startswith("*")
        or not HOST_RE.fullmatch(host)
        or (
            port
            and not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536)
        )
    ):
        raise InvalidValue(
            f"{what}={show(value)} is not a host: use a DNS name or an IPv4 address, with an "
            "optional :port (e.g. app.example.com)"
        )
    return host + (f":{int(port)}" if port else "")


def parse_status(value: str, what: str = HEALTH_STATUS) -> tuple[int, int]:
    match = STATUS_RE.fullmatch(value.strip())
    low = int(match.group(1)) if match else 0
    high = int(match.group(2) or low) if match else 0
    if not match or high < low:
        raise InvalidValue(
            f"{what}={show(value)} is not a status range: use one status from 100 to 599 or "
            "a range LOW-HIGH (e.g. 200-399, the default)"
        )
    return low, high


def parse_hash_key(value: str, what: str = HASH_KEY) -> str:
    """A key built only from known nginx variables and harmless literal characters."""
    text = value.strip()
    position, variables = 0, 0
    while position < len(text):
        match = HASH_TOKEN_RE.match(text, position)
        if not match:
            raise InvalidValue(
                f"{what}={show(value)} has a character not allowed at position {position}: "
                "use nginx variables such as $request_uri, $remote_addr, $http_x_user, "
                "$cookie_id, $arg_id and the characters A-Z a-z 0-9 _ . : / , = -"
            )
        variable = match.group(1)
        if variable is not None:
            if variable not in HASH_VARIABLES and not HASH_PREFIX_VARIABLE_RE.fullmatch(variable):
                raise InvalidValue(
                    f"{what}={show(value)} uses unknown variable {show('$' + variable)} "
                    "(a name goes on as far as letters, digits and '_' do): allowed are "
                    f"{', '.join('$' + v for v in sorted(HASH_VARIABLES))} and $http_*, "
                    "$cookie_*, $arg_*"
                )
            variables += 1
        position = match.end()
    if variables == 0 or len(text) > 200:
        raise InvalidValue(
            f"{what}={show(value)} must contain at least one nginx variable "
            "(e.g. $request_uri) and be at most 200 characters"
        )
    return text


def parse_hosts(value: str) -> tuple[str, ...]:
    hosts = []
    for part in value.split(","):
        host = part.strip().lower().rstrip(".")
        if not host:
            continue
        if len(host) > 253 or not HOST_RE.fullmatch(host):
            raise InvalidValue(
                f"{HOSTS} has an invalid host name {show(part)}: use DNS names such as "
                "shop.example.com or *.example.com, separated by commas"
            )
        hosts.append(host)
    return tuple(dict.fromkeys(hosts))


def parse_method(value: str, what: str = ALGORITHM) -> Method:
    return _one_of(Method, value, what, "a method")


def parse_dataplane(value: str, what: str = DATAPLANE) -> DataPlane:
    return _one_of(DataPlane, value, what, "a data plane")


def parse_endpoint(value: str) -> SwarmEndpoint:
    return _one_of(SwarmEndpoint, value, ENDPOINT, "an endpoint")


def _one_of(kind: type[E], value: str, what: str, noun: str) -> E:
    """A member of a string enum, by its value, case and spaces aside."""
    try:
        return kind(value.strip().lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidValue(f"{what}={show(value)} is not {noun}: use one of {allowed}") from None


def parse_config_path(value: str) -> str:
    path = value.strip()
    if path == "/etc/nginx/nginx.conf":
        raise InvalidValue(
            f"{CONFIG_PATH}={show(value)} would replace nginx's main config with a fragment for "
            "its http block: use a file that nginx.conf includes, e.g. in /etc/nginx/conf.d/"
        )
    if not CONFIG_PATH_RE.fullmatch(path) or "/../" in path or "/./" in path:
        raise InvalidValue(
            f"{CONFIG_PATH}={show(value)} must be an absolute path to a .conf file made of "
            "letters, digits, '_', '.', '-' (e.g. /etc/nginx/conf.d/controlplane.conf)"
        )
    return path


@dataclass(frozen=True)
class BackendLabels:
    """Per-container settings; None means the label is absent."""

    enabled: bool = True
    service: str | None = None
    port: int | None = None
    weight: int = 1
    backup: bool = False
    max_fails: int | None = None
    fail_timeout: str | None = None
    max_conns: int | None = None


@dataclass(frozen=True)
class ServiceLabels:
    """Service-wide settings a backend proposes; None means this backend says nothing."""

    method: Method | None = None
    hash_key: str | None = None
    consistent: bool | None = None
    two: bool | None = None
    hosts: tuple[str, ...] | None = None
    health: HealthMode | None = None
    start_period: int | None = None
    health_path: str | None = None
    health_port: int | None = None
    health_host: str | None = None
    health_status: tuple[int, int] | None = None
    health_interval: int | None = None
    health_timeout: int | None = None
    health_fails: int | None = None
    health_passes: int | None = None


class _Collector:
    """Runs each parser, keeping every error so the operator sees them all at once."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = labels
        self.errors: list[str] = []

    def get(self, label: str, parse: Callable[[str], T]) -> T | None:
        raw = self.labels.get(label)
        if raw is None:
            return None
        try:
            return parse(raw)
        except InvalidValue as error:
            self.errors.append(str(error))
            return None

    def done(self) -> None:
        if self.errors:
            raise InvalidValue("; ".join(self.errors))


def parse_backend_labels(labels: Mapping[str, str]) -> BackendLabels:
    """Raises InvalidValue naming every bad label of the container."""
    c = _Collector(labels)
    enabled = c.get(ENABLE, lambda v: parse_bool(v, ENABLE))
    result = BackendLabels(
        enabled=enabled is not False,
        service=c.get(SERVICE, lambda v: parse_name(v, SERVICE)),
        port=c.get(PORT, lambda v: parse_int(v, PORT, 1, 65535)),
        weight=c.get(WEIGHT, lambda v: parse_int(v, WEIGHT, 1, 1000)) or 1,
        backup=c.get(BACKUP, lambda v: parse_bool(v, BACKUP)) or False,
        max_fails=c.get(MAX_FAILS, lambda v: parse_int(v, MAX_FAILS, 0, 1000)),
        fail_timeout=c.get(FAIL_TIMEOUT, lambda v: parse_duration(v, FAIL_TIMEOUT)),
        max_conns=c.get(MAX_CONNS, lambda v: parse_int(v, MAX_CONNS, 0, 100_000)),
    )
    c.done()
    return result


def parse_service_labels(labels: Mapping[str, str]) -> ServiceLabels:
    """Raises InvalidValue naming every bad service-wide label of the container."""
    c = _Collector(labels)
    result = ServiceLabels(
        method=c.get(ALGORITHM, parse_method),
        hash_key=c.get(HASH_KEY, parse_hash_key),
        consistent=c.get(HASH_CONSISTENT, lambda v: parse_bool(v, HASH_CONSISTENT)),
        two=c.get(RANDOM_TWO, lambda v: parse_bool(v, RANDOM_TWO)),
        hosts=c.get(HOSTS, parse_hosts),
        health=c.get(HEALTH, parse_health),
        start_period=c.get(
            HEALTH_START_PERIOD,
            lambda v: parse_seconds(v, HEALTH_START_PERIOD, 1, MAX_START_PERIOD),
        ),
        health_path=c.get(HEALTH_PATH, parse_health_path),
        health_port=c.get(HEALTH_PORT, lambda v: parse_int(v, HEALTH_PORT, 1, 65535)),
        health_host=c.get(HEALTH_HOST, parse_health_host),
        health_status=c.get(HEALTH_STATUS, parse_status),
        health_interval=c.get(
            HEALTH_INTERVAL, lambda v: parse_milliseconds(v, HEALTH_INTERVAL, *INTERVAL_MS)
        ),
        health_timeout=c.get(
            HEALTH_TIMEOUT, lambda v: parse_milliseconds(v, HEALTH_TIMEOUT, *TIMEOUT_MS)
        ),
        health_fails=c.get(HEALTH_FAILS, lambda v: parse_int(v, HEALTH_FAILS, *THRESHOLD)),
        health_passes=c.get(HEALTH_PASSES, lambda v: parse_int(v, HEALTH_PASSES, *THRESHOLD)),
    )
    misfit = health_misfit(
        result.health,
        [f for f, label in HEALTH_LABELS.items() if label in labels],
        HEALTH_LABELS.__getitem__,
        lambda mode: f"{HEALTH}={mode}",
    )
    if misfit is not None:
        c.errors.append(misfit[1])
    c.done()
    return result


HEALTH_LABELS = MappingProxyType(
    {
        "start_period": HEALTH_START_PERIOD,
        "path": HEALTH_PATH,
        "port": HEALTH_PORT,
        "host": HEALTH_HOST,
        "status": HEALTH_STATUS,
        "interval": HEALTH_INTERVAL,
        "timeout": HEALTH_TIMEOUT,
        "fails": HEALTH_FAILS,
        "passes": HEALTH_PASSES,
    }
)
"""Each check field's label, by the API's name of the field."""


@dataclass(frozen=True)
class ContainerLabels:
    """Everything a container's controlplane.* labels say, or every error they contain."""

    backend: BackendLabels
    service: ServiceLabels
    errors: tuple[str, ...]
    unknown: tuple[str, ...]


def parse_container_labels(
    labels: Mapping[str, str],
    parsed: dict[frozenset[tuple[str, str]], ContainerLabels] | None = None,
) -> ContainerLabels:
    """Replicas of a service share their labels, so with `parsed` (a build's, kept by the
    caller) a build of thousands of containers parses each distinct label set once."""
    own = frozenset((k, v) for k, v in labels.items() if k.startswith(PREFIX))
    if parsed is None:
        return _parse_container_labels(own)
    found = parsed.get(own)
    if found is None:
        found = parsed[own] = _parse_container_labels(own)
    return found


def _parse_container_labels(own: frozenset[tuple[str, str]]) -> ContainerLabels:
    labels = dict(own)
    errors = []
    backend, service = BackendLabels(), ServiceLabels()
    try:
        backend = parse_backend_labels(labels)
    except InvalidValue as error:
        errors.append(str(error))
    try:
        service = parse_service_labels(labels)
    except InvalidValue as error:
        errors.append(str(error))
    unknown = tuple(
        sorted(k for k in labels if k not in KNOWN_LABELS and not k.startswith(TEST_PREFIX))
    )
    return ContainerLabels(backend, service, tuple(errors), unknown)


def algorithm_problem(algorithm: Algorithm) -> str | None:
    """Why a combination of service settings can't be rendered, or None when it can."""
    if algorithm.method is Method.HASH and not algorithm.key:
        return f"{ALGORITHM}=hash needs {HASH_KEY} (e.g. $request_uri)"
    return None
