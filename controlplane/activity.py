"""What the controller did lately, and where each managed nginx stands, for the API.

Fed by the reconciler's reports, the loop's failures and the API's own changes; bounded, so
a long-running controller keeps the recent past only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from controlplane.snapshot import ReconcileReport

MAX_ENTRIES = 500


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Entry:
    time: str
    kind: str
    """reconcile, held, refused (an nginx did not take a config), failure or override."""
    summary: str
    details: dict[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class NginxStatus:
    container: str
    container_id: str
    checksum: str | None = None
    """Of the config this nginx last loaded from controlplane."""
    last_attempt: str | None = None
    last_result: str | None = None
    """ok or failed."""
    last_reload: str | None = None
    last_error: str | None = None
    reloads: int = 0
    failures: int = 0
    last_push: str | None = None
    """When the dynamic data plane's state last went in (no reload)."""
    pushes: int = 0


class Activity:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Entry] = deque(maxlen=MAX_ENTRIES)
        self._nginx: dict[str, NginxStatus] = {}
        self._held: tuple[str, ...] = ()

    def entries(self, limit: int = MAX_ENTRIES) -> list[Entry]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._entries))[:limit]

    def nginx(self) -> dict[str, NginxStatus]:
        with self._lock:
            return dict(self._nginx)

    def record(self, kind: str, summary: str, **details: object) -> None:
        with self._lock:
            self._entries.append(Entry(iso_time(time.time()), kind, summary, details))

    def on_report(self, report: ReconcileReport) -> None:
        """Passes that changed nothing and deployed nothing (resyncs) are not recorded; a held
        scale-out is one entry, brought up to date as it grows."""
        if report.held:
            self._on_held(report)
            return
        self._held = ()
        if not (report.changed or report.deployed):
            return
        now = iso_time(time.time())
        with self._lock:
            for result in report.deployed:
                status = self._nginx.get(result.container_id) or NginxStatus(
                    result.container, result.container_id
                )
                if result.ok and result.pushed:
                    status = replace(
                        status,
                        last_attempt=now,
                        last_result="ok",
                        last_push=now,
                        last_error=None,
                        pushes=status.pushes + 1,
                    )
                elif result.ok:
                    status = replace(
                        status,
                        checksum=report.checksum,
                        last_attempt=now,
                        last_result="ok",
                        last_reload=now,
                        last_error=None,
                        reloads=status.reloads + 1,
                    )
                else:
                    status = replace(
                        status,
                        last_attempt=now,
                        last_result="failed",
                        last_error=result.error,
                        failures=status.failures + 1,
                    )
                self._nginx.pop(result.container_id, None)
                self._nginx[result.container_id] = status
            self._entries.extend(
                Entry(
                    now,
                    "refused",
                    f"nginx {d.container} did not take version {report.version}"
                    f"{' (nginx -t refused it)' if d.refused else ''}: {d.error}; it keeps "
                    "the config it had",
                    {"nginx": d.container, "version": report.version, "error": d.error},
                )
                for d in report.deployed
                if not d.ok
            )
            while len(self._nginx) > MAX_ENTRIES:  # containers long gone, least recent first
                del self._nginx[next(iter(self._nginx))]
            self._entries.append(
                Entry(
                    now,
                    "reconcile",
                    f"version {report.version} ({report.reason}): "
                    + "; ".join(
                        [
                            *report.changes[:3],
                            *(["..."] if len(report.changes) > 3 else []),
                            f"{sum(d.ok and not d.pushed for d in report.deployed)} nginx "
                            "reloaded, "
                            f"{sum(d.ok and d.pushed for d in report.deployed)} pushed to, "
                            f"{sum(not d.ok for d in report.deployed)} failed",
                        ]
                    ),
                    {
                        "reason": report.reason,
                        "changes": list(report.changes),
                        "version": report.version,
                        "changed": report.changed,
                        "checksum": report.checksum,
                        "nginx": [
                            {
                                "container": d.container,
                                "ok": d.ok,
                                "error": d.error,
                                "pushed": d.pushed,
                            }
                            for d in report.deployed
                        ],
                        "duration_ms": round(sum(report.timings.values()) * 1000, 1),
                    },
                )
            )

    def _on_held(self, report: ReconcileReport) -> None:
        if report.held == self._held:
            return
        entry = Entry(
            iso_time(time.time()),
            "held",
            f"holding {len(report.held)} change(s) for a scale-out ({report.reason}): "
            + "; ".join([*report.held[:3], *(["..."] if len(report.held) > 3 else [])]),
            {"reason": report.reason, "changes": list(report.held), "version": report.version},
        )
        with self._lock:
            if self._held and self._entries and self._entries[-1].kind == "held":
                self._entries.pop()
            self._entries.append(entry)
        self._held = report.held

    def on_failure(self, reason: str, error: str) -> None:
        self.record("failure", f"reconcile ({reason}) failed: {error}", reason=reason, error=error)
