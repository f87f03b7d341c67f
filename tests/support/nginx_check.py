"""`nginx -t` on the host's nginx (the binary the test image is built from), for checks that
need nginx's verdict on a config but no container."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def nginx_binary() -> str:
    """Skips without nginx locally; fails under CI=true, where the check must run."""
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is not installed; CI must run the nginx -t checks (see .ci/run)")
        pytest.skip("nginx is not installed")
    return found


def nginx_t(directory: Path, config: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on `config` included in a minimal http block; every path in `directory`."""
    (directory / "controlplane.conf").write_text(config, encoding="utf-8")
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (directory / "nginx.conf").write_text(
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'};\n"
        "events {}\n"
        "http {\n"
        f"{temp_paths}\n"
        f"    access_log {directory / 'access.log'};\n"
        f"    include {directory / 'controlplane.conf'};\n"
        "}\n",
        encoding="utf-8",
    )
    return subprocess.run(
        [
            *(nginx_binary(), "-t", "-p", str(directory)),
            *("-e", str(directory / "error.log"), "-c", str(directory / "nginx.conf")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
