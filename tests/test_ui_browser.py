"""End to end in headless Chromium: `berry ui berry-chat` (which starts its own `berry serve` on a free port, then
Streamlit on another), "What is 12*7?" typed into the chat box over the DevTools protocol, and the streamed answer,
which must say 84. The screenshot goes to docs/ui.png (the README shows it) only under BERRY_SCREENSHOT=1 (`make
screenshot`); otherwise to the test's temp dir, so `make test` leaves the tree clean. Without Chromium it skips,
saying why, which under CI=true is a failure (tests/conftest.py)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from berrylm.ui.client import DEFAULT_URL
from berrylm.ui.server import free_port, is_up

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
QUESTION = "What is 12*7?"


class DevTools:
    """The few DevTools-protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # skip events until our answer
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

    def wait_for(self, expr: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_chromium(profile: str) -> tuple[subprocess.Popen, str]:
    """Headless Chromium on a free DevTools port; returns (process, websocket URL of its blank page)."""
    port = free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--disable-dev-shm-usage", f"--remote-debugging-port={port}", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return proc, pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("Chromium did not open its DevTools port")


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    """Stop a process we started in its own session (and the children it started), by its group id."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(300)  # a hang guard: the model server, Streamlit and Chromium all start within it
def test_browser_chat_and_screenshot(tmp_path):
    if CHROMIUM is None:
        print("SKIP reason: Chromium is not installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    model = "berry-chat"  # the embedded model; it answers 12*7 with a calculator call and "84"
    port = free_port()
    log = open(tmp_path / "ui.log", "w+")
    ui = subprocess.Popen([sys.executable, "-m", "berrylm", "ui", model, "--port", str(port)], cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    chrome = None
    profile = tempfile.mkdtemp(prefix="berry-chromium-")
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", timeout=90)
        log.seek(0)
        served = re.search(r"model server (http://\S+/v1)", log.read())
        assert served, "berry ui did not say which model server it uses"
        server_url = served.group(1)
        assert is_up(server_url)

        chrome, ws_url = start_chromium(profile)
        with connect(ws_url, max_size=64 * 2**20, open_timeout=10) as ws:
            png, texts = ask_and_screenshot(DevTools(ws), port)
        assert server_url != DEFAULT_URL  # its own server, whatever runs on port 8000
        assert QUESTION in texts[0]
        assert "84" in texts[1], texts[1]
        assert "TTFT" in texts[1] and "tok/s" in texts[1]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        shot = ROOT / "docs" / "ui.png" if os.environ.get("BERRY_SCREENSHOT") == "1" else tmp_path / "ui.png"
        shot.write_bytes(png)
        print(f"screenshot: {shot} ({len(png)} bytes), model {model}, answer: {texts[1][:80]!r}")
    finally:
        if chrome is not None:
            stop_group(chrome, signal.SIGTERM)
        stop_group(ui)
        shutil.rmtree(profile, ignore_errors=True)
        log.close()
    assert not is_up(server_url), "berry ui left its model server running"


def ask_and_screenshot(dt: DevTools, port: int) -> tuple[bytes, list[str]]:
    """Load the app, wait for it to render, ask QUESTION, wait for the streamed answer; (png, message texts)."""
    dt.call("Page.enable")
    dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    dt.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
    box = '[data-testid="stChatInput"] textarea'
    dt.wait_for(f"!!document.querySelector('{box}')", 60, "the chat input")
    dt.wait_for("document.querySelectorAll('[data-testid=\"stSelectbox\"]').length > 0", 30, "the sidebar")
    dt.js(f"document.querySelector('{box}').focus()")
    dt.call("Input.insertText", text=QUESTION)
    for kind in ("keyDown", "keyUp"):
        dt.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}))
    msgs = "document.querySelectorAll('[data-testid=\"stChatMessage\"]')"
    dt.wait_for(f"{msgs}.length >= 2 && [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')]"
                ".some(e => e.innerText.includes('tok/s'))", 90, "the streamed answer and its stats")
    dt.wait_for("!document.querySelector('[data-testid=\"stStatusWidget\"]')", 30, "the script to finish")
    time.sleep(0.5)
    texts = dt.js(f"[...{msgs}].map(e => e.innerText)")
    assert not dt.js("!!document.querySelector('[data-testid=\"stException\"]')"), "a traceback in the page"
    shot = dt.call("Page.captureScreenshot", format="png")
    return base64.b64decode(shot["data"]), texts
