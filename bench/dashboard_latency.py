"""API change to dashboard: how long from a change made through the API (PATCH drain with
httpx, no ?wait) until the dashboard open in Chromium shows it, and what the open dashboard
costs the controller.

Runs a real controller with its API on loopback (in this process), a managed nginx and three
busybox backends from the offline test images, and Debian's chromium through Playwright on the
service page. In the page a MutationObserver notes when the backend's state cell changes, and
the next animation frame (the one that paints it) is the time taken. Changes are spread at
random over the poll period. The cost is this process's CPU time (the controller; the browser
runs in processes of its own) over 10 s with no page, the service page and the overview open.
Run:

    .venv/bin/python bench/dashboard_latency.py [--changes 20]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx
from playwright.sync_api import Page, Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Running, machine_line, row, table
from controlplane.settings import Settings
from images.build import ensure_images
from tests.support.browser import chromium
from tests.support.lab import Lab, wait_until

SERVICE = "web"
POLL_S = 0.5
COST_WINDOW_S = 10.0
WATCH = """([name, word]) => {
  window.__seen = new Promise((resolve) => {
    const shows = () => {
      const row = [...document.querySelectorAll("#main tbody tr")].find(
        (r) => r.cells[0] && r.cells[0].textContent.startsWith(name));
      return Boolean(row && row.cells[2].textContent === word);
    };
    const painted = () =>
      requestAnimationFrame(() => resolve(performance.timeOrigin + performance.now()));
    if (shows()) return painted();
    const observer = new MutationObserver(() => {
      if (shows()) {
        observer.disconnect();
        painted();
      }
    });
    observer.observe(document.getElementById("main"),
                     {subtree: true, childList: true, characterData: true});
  });
}"""


def cpu_share(page: Page, page_url: str | None, window: float) -> tuple[float, int]:
    """(CPU seconds per second of this process, API requests the page made) over `window`."""
    requests: list[str] = []

    def count(request: Request) -> None:
        if "/api/v1/" in request.url:
            requests.append(request.url)

    page.goto(page_url or "about:blank")
    if page_url:
        page.wait_for_selector("#main tbody tr")
    page.wait_for_timeout(1000)
    page.on("request", count)
    started_cpu, started = time.process_time(), time.monotonic()
    time.sleep(window)
    used = (time.process_time() - started_cpu) / (time.monotonic() - started)
    page.wait_for_timeout(10)  # let Playwright deliver the request events of the window
    page.remove_listener("request", count)
    return used, len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="changes to measure")
    args = parser.parse_args()

    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    shown: list[float] = []
    replied: list[float] = []
    costs: list[tuple[str, float, int]] = []
    pacing = random.Random(17)
    try:
        net = lab.network("bench")
        lab.nginx(net)
        backends = [lab.backend(net, alias=SERVICE) for _ in range(3)]
        target = str(backends[0].name)
        with tempfile.TemporaryDirectory() as state_dir, tempfile.TemporaryDirectory() as profile:
            settings = Settings(
                networks=frozenset({net.name}), api_bind="127.0.0.1:0", state_dir=Path(state_dir)
            )
            running = Running(settings)
            assert running.controller.api is not None
            url = running.controller.api.url
            api = httpx.Client(base_url=url, timeout=30)
            wait_until(
                lambda: len(api.get(f"/api/v1/services/{SERVICE}").json()["backends"]) == 3,
                what="the three backends",
            )
            with chromium(Path(profile)) as context:
                page = context.new_page()
                page.goto(f"{url}/#/service/{SERVICE}")
                page.wait_for_selector("#main tbody tr")
                for n in range(args.changes):
                    drain = n % 2 == 0
                    page.evaluate(WATCH, [target, "draining" if drain else "serving"])
                    time.sleep(pacing.uniform(0, POLL_S))
                    sent = time.time()
                    reply = api.patch(
                        f"/api/v1/services/{SERVICE}/backends/{target}", json={"drain": drain}
                    )
                    replied.append((time.time() - sent) * 1000)
                    reply.raise_for_status()
                    seen = float(page.evaluate("window.__seen"))
                    shown.append(seen - sent * 1000)
                for what, where in (
                    ("no page open", None),
                    ("service page open", f"{url}/#/service/{SERVICE}"),
                    ("overview open", f"{url}/"),
                ):
                    used, requests = cpu_share(page, where, COST_WINDOW_S)
                    costs.append((what, used, requests))
            running.close()
    finally:
        lab.cleanup()

    print(machine_line())
    print(
        f"{args.changes} changes (drain, undrain) through the API, no ?wait; the dashboard's "
        f"service page open in headless Chromium, polling every {POLL_S * 1000:.0f} ms\n"
    )
    print(
        table(
            [
                row("PATCH sent -> the open page shows it (painted)", shown),
                row("PATCH sent -> API reply", replied),
            ]
        )
    )
    print(f"\nwhat the open dashboard costs the controller (over {COST_WINDOW_S:.0f} s):\n")
    print(
        table(
            [
                [what, f"{used * 100:.1f} %", f"{requests / COST_WINDOW_S:.1f}"]
                for what, used, requests in costs
            ],
            header=("dashboard", "controller CPU (of one core)", "API requests/s"),
        )
    )


if __name__ == "__main__":
    main()
