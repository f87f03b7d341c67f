"""The override store: what is acknowledged survives, what is corrupt stops the start and is
left as it is."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from controlplane.core.model import Algorithm, BackendOverride, HealthCheck, HealthMode, Method
from controlplane.core.overrides import HealthSpec
from controlplane.errors import InvalidValue, StateError
from controlplane.store import FILE_NAME, SCHEMA_VERSION, OverrideStore

HASH = Algorithm(Method.HASH, "$request_uri", consistent=True)
HTTP = HealthSpec(
    path="/healthz", port=8080, host="app.example.com", status="200-299", interval="2500ms"
).to_check()


def test_changes_survive_reopening(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    store.set_algorithm("web", HASH)
    store.update_backend("web", "w1", lambda _: BackendOverride(weight=5, drain=True))
    store.set_algorithm("api", Algorithm(Method.LEAST_CONN))
    store.clear_algorithm("api")
    store.close()
    again = OverrideStore(tmp_path)
    assert again.current.algorithms == {"web": HASH}
    assert again.current.backends == {"web": {"w1": BackendOverride(5, True)}}
    again.close()


def test_health_checks_survive_reopening(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    store.set_health("web", HTTP)
    store.set_health("api", HealthSpec(mode="none").to_check())
    store.set_health("db", HealthSpec(mode="tcp", fails=1, start_period="5m").to_check())
    store.clear_health("db")
    store.close()
    again = OverrideStore(tmp_path)
    assert again.current.health == {
        "web": HTTP,
        "api": HealthCheck(mode=HealthMode.NONE, active=False),
    }
    assert again.current.health["web"].interval_ms == 2500
    again.close()


# The file as the first version of the schema wrote it.
SCHEMA_1 = """
CREATE TABLE algorithm (service TEXT PRIMARY KEY, method TEXT NOT NULL, key TEXT,
    consistent INTEGER NOT NULL, two INTEGER NOT NULL);
CREATE TABLE backend (service TEXT NOT NULL, container TEXT NOT NULL, weight INTEGER,
    drain INTEGER NOT NULL, PRIMARY KEY (service, container));
INSERT INTO algorithm VALUES ('web', 'hash', '$request_uri', 1, 0);
INSERT INTO backend VALUES ('web', 'w1', 5, 1);
PRAGMA user_version = 1;
"""


def test_a_file_of_the_first_schema_keeps_everything_and_takes_health(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        db.executescript(SCHEMA_1)
    db.close()
    reader = OverrideStore(tmp_path, read_only=True)  # `render` before the first start
    assert reader.current.algorithms == {"web": HASH} and reader.current.health == {}
    reader.close()
    store = OverrideStore(tmp_path)
    assert store.current.algorithms == {"web": HASH}
    assert store.current.backends == {"web": {"w1": BackendOverride(5, True)}}
    store.set_health("web", HTTP)
    store.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()
    again = OverrideStore(tmp_path)
    assert again.current.health == {"web": HTTP} and again.current.algorithms == {"web": HASH}
    again.close()


def test_a_check_the_api_could_not_make_is_never_written(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    with pytest.raises(InvalidValue) as refused:
        store.set_health("web", HealthCheck(mode=HealthMode.TCP, active=True, path="/x"))
    assert refused.value.details == {"field": "path"}
    assert store.current.health == {}
    store.close()


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("mode", "'udp'", "'udp' is not a valid HealthMode"),
        ("path", "'/a b'", "path='/a b' is not a path"),
        ("host", "'x;y'", "host='x;y' is not a host"),
        ("port", "0", "port='0' must be a whole number from 1 to 65535"),
        ("port", "'eighty'", "port='eighty'"),
        ("status_low", "600", "status='600-299' is not a status range"),
        ("interval_ms", "5", "interval='5ms' is not a duration from 0.1s"),
        ("timeout_ms", "1.5", "timeout='1.5ms'"),
        ("fails", "0", "fails='0' must be a whole number from 1 to 100"),
        ("passes", "'two'", "passes='two'"),
        ("start_period", "7200", "start_period='7200s' is not a duration from 1s to 3600s"),
    ],
    ids=lambda v: str(v)[:12],
)
def test_a_bad_health_check_stops_the_start(
    tmp_path: Path, column: str, value: str, says: str
) -> None:
    store = OverrideStore(tmp_path)
    store.set_health("web", HTTP)
    store.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        db.execute(f"UPDATE health SET {column} = {value}")
    db.close()
    with pytest.raises(StateError, match="holds a value controlplane can't use") as stopped:
        OverrideStore(tmp_path)
    assert "the health check of service 'web'" in str(stopped.value)
    assert says in str(stopped.value)


def test_an_empty_override_is_deleted(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    store.update_backend("web", "w1", lambda _: BackendOverride(weight=2))
    store.update_backend("web", "w1", lambda _: BackendOverride())
    assert store.current.backends == {}
    store.update_backend("web", "w2", lambda _: BackendOverride())
    assert store.current.backends == {}


def test_concurrent_changes_to_one_backend_all_land(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    threads = [
        threading.Thread(
            target=store.update_backend,
            args=("web", "w1", lambda o, n=n: BackendOverride(o.weight, o.drain or n == 0)),
        )
        for n in range(8)
    ] + [
        threading.Thread(
            target=store.update_backend,
            args=("web", "w1", lambda o: BackendOverride((o.weight or 0) + 1, o.drain)),
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.current.backends["web"]["w1"] == BackendOverride(8, True)
    store.close()
    store.close()


def test_in_memory_without_a_directory() -> None:
    store = OverrideStore(None)
    store.set_algorithm("web", HASH)
    assert store.current.algorithms == {"web": HASH}
    store.close()


def test_a_corrupt_file_stops_the_start_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    garbage = b"SQLite format 3\x00" + b"\xde\xad" * 4000
    path.write_bytes(garbage)
    with pytest.raises(StateError, match=r"unreadable or corrupt.*does not replace it"):
        OverrideStore(tmp_path)
    assert path.read_bytes() == garbage


def test_a_value_outside_the_grammar_stops_the_start(tmp_path: Path) -> None:
    OverrideStore(tmp_path).close()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        db.execute("INSERT INTO algorithm VALUES ('web', 'hash', '$uri; } server {', 0, 0)")
    with pytest.raises(StateError, match="holds a value controlplane can't use"):
        OverrideStore(tmp_path)


def test_a_newer_schema_stops_the_start(tmp_path: Path) -> None:
    OverrideStore(tmp_path).close()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="newer controlplane"):
        OverrideStore(tmp_path)


def test_an_unusable_directory_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="--state-dir"):
        OverrideStore(blocker / "state")


WRITER = """
import sys
from pathlib import Path
from controlplane.core.model import BackendOverride
from controlplane.store import OverrideStore

store = OverrideStore(Path(sys.argv[1]))
for n in range(1, 100_000):
    store.update_backend("web", f"w{n}", lambda _: BackendOverride(weight=n % 1000 + 1))
    print(n, flush=True)
"""


@pytest.mark.parametrize("after", [0.3, 0.6, 0.9], ids=["early", "middle", "late"])
def test_kill_9_loses_no_acknowledged_change(tmp_path: Path, after: float) -> None:
    """A writer acknowledges each change on stdout once `update_backend` returned; SIGKILL it
    mid-stream: every acknowledged change is there and the file opens cleanly."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    first = writer.stdout.readline()  # timed from the first change, not the interpreter's start
    assert first, "the writer exited before its first change"
    time.sleep(after)
    writer.kill()
    output, _ = writer.communicate(timeout=10)
    acknowledged = [int(line) for line in (first + output).split()]
    store = OverrideStore(tmp_path)
    kept = store.current.backends["web"]
    assert all(f"w{n}" in kept for n in acknowledged)
    store.close()


def test_read_only_sees_the_overrides_and_writes_nothing(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    store.set_algorithm("web", HASH)
    store.close()
    before = (tmp_path / FILE_NAME).read_bytes()
    reader = OverrideStore(tmp_path, read_only=True)
    assert reader.current.algorithms == {"web": HASH}
    with pytest.raises(StateError, match="could not save"):
        reader.set_algorithm("api", HASH)
    reader.close()
    assert (tmp_path / FILE_NAME).read_bytes() == before
