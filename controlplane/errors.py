"""One error root, so callers can catch everything controlplane raises on purpose.

Messages say what happened and what to do next; the causing library error is chained.
"""


class ControlPlaneError(Exception):
    """Root of every error controlplane raises deliberately."""


class InvalidValue(ControlPlaneError):
    """A label, flag or request value does not match its grammar. `details` says, for an API
    client, which field was wrong and what is allowed."""

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class DockerUnavailable(ControlPlaneError):
    """The Docker engine cannot be reached; temporary, retried by the loop."""


class DeployError(ControlPlaneError):
    """A config could not be put into, tested in or reloaded by one nginx container."""


class TemplateError(ControlPlaneError):
    """A template is missing or fails to render; the previous config stays in place."""


class StateError(ControlPlaneError):
    """The persisted overrides can't be read or written; never silently replaced."""


class ApiError(ControlPlaneError):
    """A request the API refuses, with the HTTP status and the `code` its JSON error carries;
    `details` says, for a client, what was wrong and what is allowed."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
