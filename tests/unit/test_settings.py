"""The flags of `controlplane run`: each read from its environment variable too, and a wrong
pair refused with what to do, never repaired."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from controlplane.cli import main
from controlplane.errors import InvalidValue
from controlplane.settings import Settings


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--debounce", "2"],
            {},
            "--debounce-max (1 s) is shorter than --debounce (2 s)",
        ),
        (
            [],
            {"CONTROLPLANE_BATCH_MAX": "1"},
            "--batch-max (1 s) is shorter than --batch-quiet (2 s)",
        ),
    ],
    ids=["debounce-pair", "batch-pair-from-the-environment"],
)
def test_a_wrong_pair_is_refused(args: list[str], env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", "--api-bind", "off", *args], env=env)
    assert result.exit_code == 2
    assert message in result.output


def test_batch_max_zero_holds_nothing_and_is_allowed() -> None:
    assert Settings(batch_max=0).batch_max == 0
    with pytest.raises(InvalidValue, match="--debounce-max"):
        Settings(quiet_window=0.5, max_wait=0.1)


def test_every_flag_of_run_has_its_environment_variable() -> None:
    run = main.commands["run"]
    flags = [p for p in run.params if p.name not in ("help",)]
    assert all(p.envvar for p in flags), [p.name for p in flags if not p.envvar]
    names = {p.opts[0]: p.envvar for p in flags}
    assert names["--dns-bind"] == "CONTROLPLANE_DNS_BIND"
    assert names["--api-token"] == "CONTROLPLANE_API_TOKEN"
    assert names["--state-dir"] == "CONTROLPLANE_STATE_DIR"
    settable = {p.name for p in flags} - {"log_level"}
    assert settable <= set(Settings.__dataclass_fields__)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_dns_udp_answers_refuses_what_is_not_a_count(value: str) -> None:
    result = CliRunner().invoke(main, ["run", "--api-bind", "off", "--dns-udp-answers", value])
    assert result.exit_code == 2
    assert "--dns-udp-answers" in result.output
