"""Chromium driven by Playwright, for the dashboard's tests and bench.

The browser is Debian's `chromium` package (scripts/install-system-deps installs it): these
machines download no browser build, so Playwright is pointed at it. Each launch gets a fresh
profile, and the switches keep Chromium from calling home while a test runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Page

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAILED_FETCH = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


class BrowserUnavailable(Exception):
    """No Chromium or no Playwright here: what to install says the message."""


def check() -> None:
    """BrowserUnavailable unless Chromium and Playwright are both here."""
    if not CHROMIUM.exists():
        raise BrowserUnavailable(
            f"{CHROMIUM} is missing: install Debian's chromium package "
            "(scripts/install-system-deps does, as root)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as error:
        raise BrowserUnavailable(
            f"Playwright is not installed ({error}): run make dev (pip install -e '.[dev]')"
        ) from error


@contextmanager
def chromium(profile: Path, width: int = 1400, height: int = 900) -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh profile in `profile` (an empty directory)."""
    check()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()


class Console:
    """What a page logged as an error, and the exceptions it did not catch."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("dialog", self._dialog)

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _dialog(self, dialog: Dialog) -> None:
        """No dialog is expected: one is a script that should not have run (e.g. alert)."""
        self.errors.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def unexpected(self, *statuses: int) -> list[str]:
        """The errors, less Chromium's line for each fetch answered with one of `statuses`
        (a 401 or 422 a test asks for on purpose)."""
        return [
            e
            for e in self.errors
            if not ((m := FAILED_FETCH.search(e)) and int(m.group(1)) in statuses)
        ]
