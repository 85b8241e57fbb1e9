"""Shared helpers for tests (and scripts) that drive the real app.

- ``AppServer``: ``streamlit run app.py`` on a free port as a subprocess (headless, no file
  watcher), started and health-checked at ``/_stcore/health``, stopped by its own process id.
- ``launch_chromium(playwright)``: Debian's Chromium (``/usr/bin/chromium``) through Playwright.
- ``require_browser()``: skip when Chromium or Playwright is missing, unless ``CI`` is set (then
  the test fails: under CI the browser tests must run).
- ``wait_idle(page)``: wait until the app's script has stopped running.

Server logs and screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 180
# No proxy for the local server, whatever the environment says.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET to the local server, without any proxy."""
    with _LOCAL.open(url, timeout=timeout) as response:
        return response.status, response.read()


class AppServer:
    """``streamlit run app.py`` on a free port. Use as a context manager, or ``start()``/``stop()``.

    ``url`` is ``http://127.0.0.1:<port>``; ``pid`` the server's process id; ``log`` its output.
    """

    def __init__(self, name: str = "server", extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = ARTIFACTS / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "streamlit", "run", "app.py",
                "--server.port", str(self.port),
                "--server.headless", "true",
                "--server.fileWatcherType", "none",
                "--browser.gatherUsageStats", "false",
                *self.extra_args]

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not running"
        return self.process.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> "AppServer":
        ARTIFACTS.mkdir(exist_ok=True)
        self._log_handle = open(self.log, "w")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env,
                                        stdout=self._log_handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"streamlit exited with {self.process.returncode}; see {self.log}")
            try:
                status, body = http_get(f"{self.url}/_stcore/health", timeout=2)
                if status == 200 and body.strip() == b"ok":
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        """Terminate the server (this process only, by its id); kill it if it does not exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def browser_problem() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"no Chromium at {CHROMIUM}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


def require_browser() -> None:
    """Skip when the browser cannot run, except under CI (env ``CI`` set): then fail."""
    import pytest

    why = browser_problem()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so the browser tests must run)")
    pytest.skip(why)


def launch_chromium(playwright, **kwargs):
    """Debian's headless Chromium through Playwright."""
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    return playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS, **kwargs)


SCRIPT_STATE = '[data-testid="stApp"]'


def script_state(page) -> str | None:
    """The app's script state as the frontend shows it on its root element: "initial",
    "running", "notRunning", "rerunRequested", ... (None before the app has rendered)."""
    root = page.locator(SCRIPT_STATE)
    return root.first.get_attribute("data-test-script-state") if root.count() else None


def wait_idle(page, timeout: float = 600, settle: float = 1.0) -> None:
    """Wait until the app's script has finished running and stays finished for ``settle`` s.

    Uses the root element's ``data-test-script-state`` (the status widget is not shown with
    ``client.toolbarMode = "minimal"``).
    """
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if script_state(page) == "notRunning" and not page.locator('[data-testid="stSpinner"]').count():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle:
                return
        else:
            quiet_since = None
        time.sleep(0.2)
    raise TimeoutError(f"the app was still running after {timeout:.0f} s (state {script_state(page)!r})")
