"""What the API's event list keeps of passes: a held scale-out once per growth, not per pass."""

from __future__ import annotations

from controlplane.activity import Activity
from controlplane.snapshot import ReconcileReport


def held(*changes: str) -> ReconcileReport:
    return ReconcileReport("1 event(s)", 3, False, (), held=changes)


def test_a_held_scale_out_is_one_entry_kept_up_to_date() -> None:
    activity = Activity()
    for report in (held("+ a"), held("+ a"), held("+ a", "+ b"), held("+ a", "+ b")):
        activity.on_report(report)
    entries = activity.entries()
    assert [e.kind for e in entries] == ["held"]
    assert entries[0].summary.startswith("holding 2 change(s) for a scale-out")
    assert entries[0].details["changes"] == ["+ a", "+ b"]


def test_after_a_hold_is_applied_the_same_hold_is_news_again() -> None:
    activity = Activity()
    activity.on_report(held("+ a"))
    activity.on_report(ReconcileReport("held new backends", 4, True, (), changes=("+ a",)))
    activity.on_report(held("+ a"))
    assert [e.kind for e in activity.entries()] == ["held", "reconcile", "held"]
