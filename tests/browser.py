"""Open a report in a real headless Chromium over the DevTools protocol (--remote-debugging-pipe, stdlib only):
collect console errors, uncaught exceptions and every network request, evaluate a DOM query, take a
screenshot and print to PDF. Used by the tests; `python tests/browser.py REPORT.html [OUT.png]`."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install Chromium: apt-get install -y chromium (or set BENCH_CHROMIUM=/path/to/chrome)"
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


def find_chromium() -> str | None:
    for candidate in (os.environ.get("BENCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                      "google-chrome-stable"):
        if candidate and (shutil.which(candidate) or (os.path.isfile(candidate) and os.access(candidate, os.X_OK))):
            return shutil.which(candidate) or candidate
    return None


@dataclass
class PageCheck:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, error log entries
    warnings: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    value: object = None  # result of the evaluated expression
    screenshot: bytes = b""
    pdf: bytes = b""

    @property
    def external_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)]


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.next_id = 0
        self.inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.inbox.put(json.loads(msg))

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            got = self.inbox.get(timeout=max(0.01, deadline - time.time()))
            if got is None:
                raise RuntimeError(f"Chromium closed the DevTools pipe during {method}")
            if got.get("id") == self.next_id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got.get("result", {})
            self.events.append(got)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.time() + timeout
        while True:
            got = self.inbox.get(timeout=max(0.01, deadline - time.time()))
            if got is None:
                raise RuntimeError(f"Chromium closed the DevTools pipe waiting for {method}")
            self.events.append(got)
            if got.get("method") == method:
                return got

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                got = self.inbox.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                return
            if got is None:
                return
            self.events.append(got)


def check_page(html_path: str | Path, expression: str = "null", width: int = 1280, height: int = 900,
               pdf: bool = False, timeout: float = 90, chromium: str | None = None) -> PageCheck:
    """Load html_path (file://) in headless Chromium and report what happened (see PageCheck)."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError(f"no Chromium found; {INSTALL_HINT}")
    url = Path(html_path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    # keep the child's ends well above 4 so that dup2 onto 3 and 4 cannot clobber one with the other
    hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
    hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(to_child_r)
    os.close(from_child_w)

    def child_fds():  # Chromium reads DevTools commands from fd 3 and writes replies to fd 4
        os.dup2(hi_r, 3)
        os.dup2(hi_w, 4)

    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
           "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
           f"--window-size={width},{height}", "about:blank"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False,
                            preexec_fn=child_fds)
    os.close(hi_r)
    os.close(hi_w)
    pipe = _Pipe(proc, to_child_w, from_child_r)
    result = PageCheck()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                          "deviceScaleFactor": 1, "mobile": False}, session)
        pipe.send("Page.navigate", {"url": url}, session, timeout=timeout)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        pipe.drain(0.5)
        got = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session)
        if "exceptionDetails" in got:
            result.errors.append(f"evaluate: {got['exceptionDetails'].get('text')}")
        result.value = got.get("result", {}).get("value")
        size = pipe.send("Page.getLayoutMetrics", session=session).get("cssContentSize", {})
        clip = {"x": 0, "y": 0, "width": width, "height": min(int(size.get("height", height)), 16000), "scale": 1}
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session, timeout=timeout)
        result.screenshot = base64.b64decode(shot["data"])
        if pdf:
            result.pdf = base64.b64decode(pipe.send("Page.printToPDF", {"printBackground": False}, session,
                                                    timeout=timeout)["data"])
        pipe.drain(0.2)
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, queue.Empty):
            pass
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for fd in (to_child_w, from_child_r):
            try:
                os.close(fd)
            except OSError:
                pass
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
    for ev in pipe.events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            (result.errors if params.get("type") in ("error", "assert") else result.warnings).append(text)
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            result.errors.append(f"{d.get('text')}: {d.get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            (result.errors if entry.get("level") == "error" else result.warnings).append(
                f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            result.requests.append(params.get("request", {}).get("url", ""))
    return result


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python tests/browser.py REPORT.html [SCREENSHOT.png]", file=sys.stderr)
        return 2
    check = check_page(argv[0], "document.querySelectorAll('table').length + ' tables, ' + "
                                "document.images.length + ' images'")
    if len(argv) > 1:
        Path(argv[1]).write_bytes(check.screenshot)
    print(f"{check.value}; {len(check.errors)} errors, {len(check.external_requests)} external requests")
    for line in check.errors + check.external_requests:
        print("  " + line)
    return 1 if check.errors or check.external_requests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
