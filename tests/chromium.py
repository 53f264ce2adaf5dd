"""Headless Chromium driven over the DevTools pipe, shared by the browser tests.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe``
(NUL-terminated JSON on file descriptors 3 and 4), which needs no websocket
client and no TCP port.  The protocol reports console messages with their
level (``--enable-logging=stderr`` prints every level alike), uncaught
exceptions and every request the page makes, so a test can assert that a
page logs no error and fetches nothing from the network.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = ["TIMEOUT_S", "DevTools", "chromium", "screenshot", "wait_for_plots"]

TIMEOUT_S = 45.0


def chromium() -> str:
    """Path of Debian's chromium, which scripts/setup installs; the test fails without it."""
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not on PATH: run scripts/setup, which installs it "
                    "(the HTML rendering tests need it)", pytrace=False)
    return found


def _high_fd(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered 10 or above; ``fd`` is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """A headless Chromium and one page target, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        # Chromium reads commands from fd 3 and writes replies and events to fd 4.  The
        # child's ends are first moved to fds >= 10, so that placing them on 3 and 4 can
        # neither clobber one with the other nor be a no-op dup2 (which would leave
        # close-on-exec set).
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        to_chrome_r, from_chrome_w = (_high_fd(to_chrome_r), _high_fd(from_chrome_w))

        def wire_fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        argv = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--mute-audio",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]
        self._log = log.open("wb")
        # preexec_fn is only unsafe with threads running, and the browser tests start none.
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=wire_fds, close_fds=False,  # noqa: PLW1509
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.process.poll() is None:
                self._send("Browser.close", {}, session=False)
                self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, TimeoutError):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
            self._log.close()

    def _send(self, method: str, params: dict[str, Any], session: bool = True) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from chromium in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium exited ({self.process.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: bool = True) -> dict[str, Any]:
        """Send a command and return its result; events seen meanwhile are kept."""
        wanted = self._send(method, params or {}, session)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            message = self._receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """Wait for an event of this session (or find it among those already seen)."""
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message

    def open_page(self, width: int, height: int) -> None:
        """Attach to a new page and enable what the test listens to."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, session=False)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and non-local requests."""
        out = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(f"console.{params['type']}: "
                           + " ".join(str(a.get("value", a.get("description")))
                                      for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log: {params['entry']['text']} ({params['entry'].get('url')})")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith(("file:", "data:", "blob:", "about:")):
                    out.append(f"network request: {url}")
        return out


def wait_for_plots(browser: DevTools, plot_ids: Sequence[str],
                   timeout: float = 20.0) -> dict[str, int]:
    """Wait until every plot div has its SVG; returns the ``.main-svg`` count of each.

    Plotly.newPlot draws asynchronously after the load event on some paths.
    """
    rendered: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rendered = browser.evaluate(
            "Object.fromEntries(" + json.dumps(list(plot_ids)) + ".map(id => [id, "
            "document.querySelectorAll('#' + CSS.escape(id) + ' .main-svg').length]))")
        if all(rendered.values()):
            break
        time.sleep(0.2)
    return rendered


def screenshot(browser: DevTools, path: Path, width: int, max_height: int = 16000) -> Path:
    """A PNG of the whole page (up to ``max_height`` pixels) at ``path``."""
    size = browser.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = browser.call("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(size["height"], max_height),
                 "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
