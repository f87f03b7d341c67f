"""A small client of the REST API, for the CLI's `services`, `algorithm`, `health`, `weight`,
`drain` and `top`.

The standard library's urllib is enough for a handful of JSON calls; every failure becomes a
ControlPlaneError whose message says what to do.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import Any

from controlplane.api import API_HEADER
from controlplane.core.labels import show
from controlplane.errors import ControlPlaneError
from controlplane.settings import DEFAULT_API_PORT

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_API_PORT}"


class ApiClientError(ControlPlaneError):
    """The API refused a request or could not be reached."""


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: object | None = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        url = self.base_url + urllib.parse.quote(path)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                self._check_is_api(response.headers, response.status)
                raw = response.read()
        except urllib.error.HTTPError as error:
            self._check_is_api(error.headers, error.code)
            raise ApiClientError(_message(error)) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ApiClientError(
                f"no controlplane API answers at {self.base_url} ({reason}): is `controlplane "
                "run` running with its API on that address? Point --api (or "
                "CONTROLPLANE_API) at it"
            ) from error
        return json.loads(raw) if raw.strip().startswith(b"{") else raw.decode()

    def _check_is_api(self, headers: Message, status: int) -> None:
        """nginx, or any other server, on the port the CLI was pointed at answers too."""
        if headers.get(API_HEADER) is None:
            server = headers.get("Server")
            raise ApiClientError(
                f"{self.base_url} is not a controlplane API (it answered HTTP {status}"
                + (f", server {show(server)}" if server else "")
                + "): point --api (or CONTROLPLANE_API) at the controller's API, by default "
                f"{DEFAULT_URL}, or as set by `controlplane run --api-bind`"
            )


def _message(error: urllib.error.HTTPError) -> str:
    try:
        found = json.loads(error.read())["error"]
        message = f"{found['message']} (HTTP {error.code})"
    except (ValueError, KeyError, TypeError):
        return f"the API answered HTTP {error.code} {error.reason}"
    if error.code == 401:
        message += "; set CONTROLPLANE_API_TOKEN to the controller's token"
    return str(message)
