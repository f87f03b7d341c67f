"""A test that restarts an engine restarts its own (tests/support/engine.py): starting,
restarting and removing a private engine leaves the machine's engine as it was, and leaves
nothing of itself behind."""

from __future__ import annotations

import httpx

from images.build import ensure_images
from tests.support.engine import PrivateEngine
from tests.support.lab import Lab
from tests.support.witness import MachineEngineWitness


def test_a_private_engine_comes_and_goes_without_touching_the_machines(
    private_engine: PrivateEngine, machine_witness: MachineEngineWitness
) -> None:
    engine = private_engine
    assert engine.client.info()["DockerRootDir"] == str(engine.data_root)
    assert engine.pid != machine_witness.daemon.pid
    lab = Lab(engine.client, ensure_images(engine.client))
    with engine.entered():
        backend = lab.backend(lab.network(), ports={"80/tcp": ("127.0.0.1", None)})
        url = f"http://127.0.0.1:{lab.published_port(backend)}/"
        assert httpx.get(url).text.strip() == backend.name
        started_at, first_pid = backend.attrs["State"]["StartedAt"], engine.pid

        engine.stop()
        engine.start()

        backend.reload()
        assert engine.pid != first_pid
        assert (backend.status, backend.attrs["State"]["StartedAt"]) == ("running", started_at)
        assert httpx.get(url).text.strip() == backend.name
    engine.close()
    assert engine.leftovers() == []
    assert machine_witness.changes() == []
