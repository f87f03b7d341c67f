"""The stats listener's senders: the managed nginx's addresses, kept while an event has
cleared one's inspect (its reports must not be dropped as from an unknown source)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from controlplane.core.build import build_topology
from controlplane.core.model import ContainerFacts
from controlplane.wiring import NginxAddresses
from tests.unit.builders import container, nginx, state

LB = nginx("lb", ip="172.20.0.9")


class Source:
    def __init__(self, *facts: ContainerFacts) -> None:
        self.facts = {f.id: f for f in facts}

    def known(self, container_id: str) -> ContainerFacts | None:
        return self.facts.get(container_id)


def test_an_nginx_keeps_its_addresses_while_its_inspect_is_redone() -> None:
    topology = build_topology(state(LB, container("w1", ip="172.20.0.2")))
    reconciler = SimpleNamespace(snapshot=SimpleNamespace(topology=topology))
    source = Source(LB)
    addresses = NginxAddresses(cast(Any, reconciler), cast(Any, source))
    assert addresses() == {"172.20.0.9"}
    source.facts.clear()  # an event on it: the next pass inspects it again
    assert addresses() == {"172.20.0.9"}
    reconciler.snapshot = None  # no nginx managed: nobody is taken
    assert addresses() == frozenset()
