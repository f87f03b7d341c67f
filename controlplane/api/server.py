"""Serves the API with waitress (a production WSGI server) on a thread of its own."""

from __future__ import annotations

import logging
import threading

from flask import Flask
from waitress import wasyncore
from waitress.server import create_server

from controlplane.errors import ControlPlaneError

log = logging.getLogger(__name__)


class ApiServer:
    """Binds in the constructor, so a taken port fails the start, not a thread later."""

    def __init__(self, app: Flask, host: str, port: int, threads: int = 16) -> None:
        """16 threads: a `?wait=true` request may hold one for up to 60 s, and reads must
        still be answered while a few do."""
        try:
            self._server = create_server(
                app, host=host, port=port, threads=threads, ident="controlplane"
            )
        except OSError as error:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ControlPlaneError(
                f"the API could not listen on {where}: {error.strerror or error}; pick a free "
                "address with --api-bind (or --api-bind off)"
            ) from error
        self.host = host
        self.port: int = self._server.effective_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, name="api", daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.url)

    def stop(self) -> None:
        """Closes the sockets on the server's own thread, through its trigger: closed from
        here, they would vanish under the select() that thread is in (EBADF)."""
        server = self._server
        if self._thread is not None and self._thread.is_alive():
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
            self._thread.join(timeout=5)
        server.close()
