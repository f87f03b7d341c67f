"""What changed between two topologies, in words an operator reads in the API's events and
the log: services that came and went, backends that joined, left or changed state, methods
that changed, and containers left out (a bad label) or let in again."""

from __future__ import annotations

from controlplane.core.model import Backend, Exclusion, Service, Topology


def _backends(service: Service) -> dict[tuple[str, str], Backend]:
    return {(b.container, b.network): b for b in service.backends}


def _where(exclusion: Exclusion) -> str:
    return f"service {exclusion.service}" if exclusion.service else "container"


def _order(exclusion: Exclusion) -> tuple[str, str, str]:
    return (exclusion.service or "", exclusion.container, exclusion.reason)


def describe_changes(before: Topology, after: Topology) -> tuple[str, ...]:
    old = {s.name: s for s in before.services}
    new = {s.name: s for s in after.services}
    changes = [f"service {name} gone" for name in sorted(old.keys() - new.keys())]
    for name in sorted(new):
        service = new[name]
        previous = old.get(name)
        if previous is None:
            changes.append(
                f"service {name} appeared with {len(service.live_backends)} live backend(s), "
                f"method {service.algorithm}"
            )
            continue
        if previous.algorithm != service.algorithm:
            changes.append(
                f"service {name}: method {previous.algorithm} -> {service.algorithm} "
                f"({service.algorithm_source})"
            )
        was, now = _backends(previous), _backends(service)
        for key in sorted(now.keys() - was.keys()):
            b = now[key]
            changes.append(
                f"service {name}: + {b.container} ({b.ip or b.ipv6}:{b.port}, {b.state})"
            )
        for key in sorted(was.keys() - now.keys()):
            changes.append(f"service {name}: - {was[key].container}")
        for key in sorted(now.keys() & was.keys()):
            a, b = was[key], now[key]
            if a.state != b.state:
                changes.append(f"service {name}: {b.container} {a.state} -> {b.state}")
            if a.weight != b.weight:
                changes.append(f"service {name}: {b.container} weight {a.weight} -> {b.weight}")
    was_out, now_out = set(before.excluded), set(after.excluded)
    changes.extend(
        f"{_where(e)}: {e.container} left out: {e.reason}"
        for e in sorted(now_out - was_out, key=_order)
    )
    changes.extend(
        f"{_where(e)}: {e.container} no longer left out"
        for e in sorted(was_out - now_out, key=_order)
        if (e.container_id, e.service) not in {(n.container_id, n.service) for n in now_out}
    )
    nginx_before = {n.container for n in before.nginx}
    nginx_after = {n.container for n in after.nginx}
    changes.extend(f"nginx {n} now managed" for n in sorted(nginx_after - nginx_before))
    changes.extend(f"nginx {n} gone" for n in sorted(nginx_before - nginx_after))
    return tuple(changes)
