"""Debian's headless Chromium driven over the DevTools protocol, for the dashboard's tests.

No Playwright (it downloads its own browsers): ``chromium --remote-debugging-pipe`` speaks
the protocol's JSON messages, each ended by a NUL byte, on file descriptors 3 (to the
browser) and 4 (from it). One reader thread files answers by id and keeps events per page
session; calls wait with a timeout. Every request to anything but loopback goes to a proxy
at 127.0.0.1:9 that is not there, so a page can fetch nothing from outside.

    with Chromium() as browser:
        page = browser.page(javascript=False)
        page.goto("http://127.0.0.1:1234/")
        page.eval("document.title"), page.errors(), page.screenshot(path)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXECUTABLES = ("chromium", "chromium-browser")
FLAGS = (
    "--headless=new",
    "--remote-debugging-pipe",
    "--no-sandbox",  # tests run as root in CI; the page is our own
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--no-pings",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--font-render-hinting=none",
    # nothing leaves loopback: loopback is never proxied, everything else is (to nothing)
    "--proxy-server=http://127.0.0.1:9",
)


def executable() -> str:
    for name in EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Debian's chromium is not installed (make deps-test installs it)")


class ProtocolError(AssertionError):
    pass


class Chromium:
    """One browser process; :meth:`page` opens a tab."""

    def __init__(self, *, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="dash-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes answers
            import fcntl

            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 100)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 100)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [executable(), *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds,
            # kept open across exec: preexec_fn runs before the child closes the others
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = os.fdopen(from_browser_r, "rb", buffering=0)
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self.events: dict[str | None, list[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.call("Target.setDiscoverTargets", discover=False)
        except BaseException:  # a browser that did not start leaves no process nor profile
            self.close()
            raise

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._in.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.setdefault(message.get("sessionId"), []).append(message)
                    self._cond.notify_all()

    def call(
        self, method: str, session: str | None = None, timeout_s: float | None = None, **params: Any
    ) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError(f"{method}: no answer (browser closed: {self._closed})")
                self._cond.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    def wait_event(self, session: str, method: str, since: int, timeout_s: float) -> int:
        """Wait for event ``method`` on ``session`` after index ``since``; its index."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                events = self.events.get(session, [])
                for i in range(since, len(events)):
                    if events[i]["method"] == method:
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError(f"no {method} within {timeout_s} s")
                self._cond.wait(left)

    def page(self, *, javascript: bool = True, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        if not javascript:
            self.call("Emulation.setScriptExecutionDisabled", session, value=True)
        return Page(self, session, target)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", timeout_s=5)
                except ProtocolError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for stream in (self._out, self._in):
                try:
                    stream.close()
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str, target: str) -> None:
        self.browser = browser
        self.session = session
        self.target = target

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, self.session, **params)

    def _mark(self) -> int:
        with self.browser._cond:
            return len(self.browser.events.get(self.session, []))

    def goto(self, url: str, *, timeout_s: float = 15.0) -> None:
        mark = self._mark()
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise ProtocolError(f"{url}: {answer['errorText']}")
        self.browser.wait_event(self.session, "Page.loadEventFired", mark, timeout_s)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools evaluates it even when
        the page's own scripts are disabled)."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise ProtocolError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression[:100]} still false after {timeout_s} s")
            time.sleep(0.1)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and the browser's own error log (a resource
        that failed to load, a Content-Security-Policy violation) since the page opened."""
        out = []
        with self.browser._cond:
            events = list(self.browser.events.get(self.session, []))
        for e in events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a)) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails"))[:500])
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                entry = p["entry"]
                out.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return out

    def screenshot(self, path: Path) -> None:
        height = int(self.eval("document.documentElement.scrollHeight") or 900)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=min(max(height, 400), 4000),
            deviceScaleFactor=1,
            mobile=False,
        )
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.browser.call("Target.closeTarget", targetId=self.target)


def browser() -> Iterator[Chromium]:
    """For a module fixture: one browser per test module."""
    chromium = Chromium()
    try:
        yield chromium
    finally:
        chromium.close()
