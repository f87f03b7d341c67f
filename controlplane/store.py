"""The operator's overrides, persisted in SQLite so they survive restarts of everything.

WAL with synchronous=FULL: a change is acknowledged only after its commit reached the disk,
so a `kill -9` at any moment loses no acknowledged change and leaves no half-written file. A
state file that can't be read or fails its integrity check stops the start; it is never
replaced, since it may hold the only copy of an operator's choices. Readers get the current
`Overrides` value whole, without a lock.

A schema only grows: a newer one adds tables (`CREATE TABLE IF NOT EXISTS`), so a file an older
controlplane wrote opens with everything it held, and gets the new tables empty.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from controlplane.core.model import (
    Algorithm,
    BackendOverride,
    HealthCheck,
    HealthMode,
    Method,
    Overrides,
)
from controlplane.core.overrides import check_algorithm, check_backend, check_health
from controlplane.errors import InvalidValue, StateError

log = logging.getLogger(__name__)

FILE_NAME = "overrides.sqlite3"
SCHEMA_VERSION = 2
"""1: algorithm and backend; 2: health."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS algorithm (
    service TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    key TEXT,
    consistent INTEGER NOT NULL,
    two INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS backend (
    service TEXT NOT NULL,
    container TEXT NOT NULL,
    weight INTEGER,
    drain INTEGER NOT NULL,
    PRIMARY KEY (service, container)
);
CREATE TABLE IF NOT EXISTS health (
    service TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    path TEXT NOT NULL,
    port INTEGER,
    host TEXT,
    status_low INTEGER NOT NULL,
    status_high INTEGER NOT NULL,
    interval_ms INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    fails INTEGER NOT NULL,
    passes INTEGER NOT NULL,
    start_period INTEGER NOT NULL
);
"""
HEALTH_COLUMNS = (
    "service, mode, path, port, host, status_low, status_high, interval_ms, timeout_ms, "
    "fails, passes, start_period"
)


class OverrideStore:
    """One connection, writes serialised by a lock (the API serves from several threads)."""

    def __init__(self, directory: Path | None, read_only: bool = False) -> None:
        """`directory` None keeps the overrides in memory, for this process only; `read_only`
        opens an existing file without writing to it (`controlplane render`)."""
        self.path = directory / FILE_NAME if directory else Path(":memory:")
        self._lock = threading.Lock()
        self._db = _open_read_only(self.path) if read_only else _open(directory, self.path)
        self.current = self._load()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def set_algorithm(self, service: str, algorithm: Algorithm) -> Overrides:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO algorithm VALUES (?, ?, ?, ?, ?)",
                (
                    service,
                    algorithm.method.value,
                    algorithm.key,
                    int(algorithm.consistent),
                    int(algorithm.two),
                ),
            )
        return self.current

    def clear_algorithm(self, service: str) -> Overrides:
        with self._write() as db:
            db.execute("DELETE FROM algorithm WHERE service = ?", (service,))
        return self.current

    def set_health(self, service: str, check: HealthCheck) -> Overrides:
        """Checked again here, so nothing the start would refuse is ever written."""
        check = check_health(check)
        with self._write() as db:
            db.execute(
                f"INSERT OR REPLACE INTO health ({HEALTH_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    service,
                    check.mode.value,
                    check.path,
                    check.port,
                    check.host,
                    *check.status,
                    check.interval_ms,
                    check.timeout_ms,
                    check.fails,
                    check.passes,
                    check.start_period,
                ),
            )
        return self.current

    def clear_health(self, service: str) -> Overrides:
        with self._write() as db:
            db.execute("DELETE FROM health WHERE service = ?", (service,))
        return self.current

    def update_backend(
        self,
        service: str,
        container: str,
        change: Callable[[BackendOverride], BackendOverride],
    ) -> BackendOverride:
        """Read, change and write one backend's override as one step, so two concurrent
        changes (a weight and a drain) both land. An override that changes nothing is
        deleted rather than kept."""
        with self._write() as db:
            current = self.current.backends.get(service, {}).get(container, BackendOverride())
            updated = change(current)
            if updated == BackendOverride():
                db.execute(
                    "DELETE FROM backend WHERE service = ? AND container = ?", (service, container)
                )
            else:
                db.execute(
                    "INSERT OR REPLACE INTO backend VALUES (?, ?, ?, ?)",
                    (service, container, updated.weight, int(updated.drain)),
                )
        return updated

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._db:
                    yield self._db
                self.current = self._load()
            except sqlite3.Error as error:
                raise StateError(
                    f"could not save the change in {self.path}: {error}; nothing was changed "
                    "(check that the disk is writable and not full)"
                ) from error

    def _load(self) -> Overrides:
        try:
            algorithms = {
                service: check_algorithm(
                    Algorithm(Method(method), key, bool(consistent), bool(two))
                )
                for service, method, key, consistent, two in self._db.execute(
                    "SELECT service, method, key, consistent, two FROM algorithm"
                )
            }
            backends: dict[str, dict[str, BackendOverride]] = {}
            for service, container, weight, drain in self._db.execute(
                "SELECT service, container, weight, drain FROM backend"
            ):
                backends.setdefault(service, {})[container] = check_backend(
                    BackendOverride(weight, bool(drain))
                )
            health = self._load_health()
        except (sqlite3.Error, ValueError, InvalidValue) as error:
            raise StateError(
                f"the state file {self.path} holds a value controlplane can't use ({error}); "
                "fix or move the file away (it is left as it is)"
            ) from error
        return Overrides(algorithms, backends, health)

    def _load_health(self) -> dict[str, HealthCheck]:
        """Nothing from a file of schema 1 opened read-only (`controlplane render`): its table
        comes with the first start of this version."""
        if not self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'health'"
        ).fetchone():
            return {}
        health = {}
        for row in self._db.execute(f"SELECT {HEALTH_COLUMNS} FROM health"):
            service, mode, path, port, host, low, high, every, timeout, fails, passes, start = row
            try:
                health[service] = check_health(
                    HealthCheck(
                        mode=HealthMode(mode),
                        active=mode != HealthMode.NONE.value,
                        start_period=start,
                        path=path,
                        port=port,
                        host=host,
                        status=(low, high),
                        interval_ms=every,
                        timeout_ms=timeout,
                        fails=fails,
                        passes=passes,
                    )
                )
            except (ValueError, InvalidValue) as error:
                raise InvalidValue(f"the health check of service {service!r}: {error}") from None
        return health


def _open_read_only(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
        )
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check says: {check}")
    except sqlite3.Error as error:
        raise StateError(
            f"can't read the state file {path} ({error}): check its permissions, or restore "
            "it from a backup"
        ) from error
    return db


def _open(directory: Path | None, path: Path) -> sqlite3.Connection:
    try:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    except (OSError, sqlite3.Error) as error:
        raise StateError(
            f"can't open the state file {path}: {error}; point --state-dir at a writable directory"
        ) from error
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check says: {check}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"it was written by a newer controlplane (schema {version}, this one knows "
                f"{SCHEMA_VERSION})"
            )
        with db:
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as error:
        db.close()
        raise StateError(
            f"the state file {path} is unreadable or corrupt ({error}); controlplane does not "
            "replace it: restore it from a backup or move it away to start with no overrides"
        ) from error
    if directory is not None:
        log.info("overrides are kept in %s", path)
    return db
