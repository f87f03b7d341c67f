"""What changed between two topologies, in words an operator reads in the API's events and
the log: services that came and went, backends that joined, left or changed state, and
methods that changed."""

from __future__ import annotations

from controlplane.core.model import Backend, Service, Topology


def _backends(service: Service) -> dict[tuple[str, str], Backend]:
    return {(b.container, b.network): b for b in service.backends}


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
    nginx_before = {n.container for n in before.nginx}
    nginx_after = {n.container for n in after.nginx}
    changes.extend(f"nginx {n} now managed" for n in sorted(nginx_after - nginx_before))
    changes.extend(f"nginx {n} gone" for n in sorted(nginx_before - nginx_after))
    return tuple(changes)
