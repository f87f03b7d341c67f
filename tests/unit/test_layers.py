"""The package's layers hold: pyproject's [tool.importlinter] contracts, checked here so the
unit tests catch an import across a layer as `make lint` (lint-imports) does. Each contract is
also shown to catch the import it exists to refuse."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import Contract

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
CONFIG = read_configuration(str(PYPROJECT))
CONTRACTS = {options["id"]: options for options in CONFIG["contracts_options"]}
TYPES: dict[str, type[Contract]] = {"layers": LayersContract, "forbidden": ForbiddenContract}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("controlplane", cache_dir=None)


def kept(graph: grimp.ImportGraph, options: dict[str, Any]) -> bool:
    contract = TYPES[options["type"]](
        name=options["name"],
        session_options=CONFIG["session_options"],
        contract_options=options,
    )
    return bool(contract.check(deepcopy(graph), verbose=False).kept)


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contract_is_kept(graph: grimp.ImportGraph, contract: str) -> None:
    assert kept(graph, CONTRACTS[contract]), (
        f"contract {contract!r} is broken: run .venv/bin/lint-imports to see which imports"
    )


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("controlplane.core.model", "controlplane.reconciler", "layers"),
        ("controlplane.core.build", "controlplane.settings", "layers"),
        ("controlplane.errors", "controlplane.core.model", "layers"),
        ("controlplane.docker_source", "controlplane.reconciler", "layers"),
        ("controlplane.docker_source", "controlplane.nginx_deployer", "layers"),
        ("controlplane.reconciler", "controlplane.api.http", "layers"),
        ("controlplane.reconciler", "controlplane.wiring", "layers"),
        ("controlplane.api.routes", "controlplane.wiring", "layers"),
        ("controlplane.api.views", "controlplane.reconciler", "snapshot-readers"),
        ("controlplane.api.app", "controlplane.reconciler", "snapshot-readers"),
    ],
    ids=lambda value: value.removeprefix("controlplane."),
)
def test_contract_refuses(
    graph: grimp.ImportGraph, importer: str, imported: str, contract: str
) -> None:
    broken = deepcopy(graph)
    broken.add_import(importer=importer, imported=imported)
    assert kept(graph, CONTRACTS[contract])
    assert not kept(broken, CONTRACTS[contract])


def test_every_module_has_a_layer(graph: grimp.ImportGraph) -> None:
    """A new module must be placed in a layer before anything may import it."""
    broken = deepcopy(graph)
    broken.add_module("controlplane.newcomer")
    assert not kept(broken, CONTRACTS["layers"])
