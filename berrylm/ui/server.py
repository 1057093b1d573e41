"""Start and stop a local `berry serve` in a subprocess (for `berry chat` without --url and `berry ui`).

Why a subprocess and not the engine in-process: the server is where prompts are rendered, tool calls are
parsed and the built-in calculator runs (in its own sandbox processes); talking HTTP to it gives the terminal
and the web UI exactly what any OpenAI client gets, and a crash in the model cannot take the REPL with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the `berrylm` package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_up(base_url: str, timeout: float = 1.0) -> bool:
    """True when something answers GET /health next to an OpenAI base URL (http://host:port/v1)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (but the REPL, which survives a Ctrl-C, lets this one end it)."""


def sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so `finally: server.stop()` runs and no model server is left behind."""
    def handler(signum, frame):
        raise Terminated
    signal.signal(signal.SIGTERM, handler)


class LocalServer:
    """`python -m berrylm serve MODEL --port P` on loopback; waits for /health; stop() on exit."""

    def __init__(self, model: str | None = None, port: int | None = None, extra_args: list[str] | None = None):
        self.model, self.port = model, port or free_port()
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="berry-serve-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> LocalServer:
        cmd = [sys.executable, "-m", "berrylm", "serve", *([self.model] if self.model else []),
               "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = self.last_log_line()
                self.stop()
                raise RuntimeError(f"the local server exited: {msg}")
            if is_up(self.base_url, timeout=0.5):
                return self
            time.sleep(0.2)
        msg = self.last_log_line()
        self.stop()
        raise RuntimeError(f"the local server did not come up within {timeout:.0f} s: {msg}")

    def last_log_line(self) -> str:
        lines = [ln for ln in Path(self.log.name).read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
