"""Run the calculator in worker processes with hard limits, so nothing a model writes can hang or crash the server.

Each worker is a plain `python -E -S -B -m berrylm.serve.tools.sandbox` subprocess speaking JSON lines over its pipes:
the parent writes one JSON string (the expression), the worker answers `[ok, content]`. Defence in depth behind
the calculator's AST whitelist (serve/confine.py): the worker starts in its own session with an empty environment
(no API key), and at start it imports its target, drops to `nobody` when started as root, limits itself with
setrlimit (address space, file size 0, no core dumps, few file descriptors, no new processes), runs one warm-up
call, then installs a seccomp filter under which opening any file, making a socket, starting a process or program,
signalling another process or changing the filesystem fails. It reports which layers are in force in its first
line; `Calculator.defences` holds them (a system without seccomp keeps the others, and the server logs a warning).
Before each call it moves its soft CPU limit to "used so far + cpu_s", so a runaway call dies of SIGXCPU.
The parent also keeps a wall-clock timeout per call (default 1 s): when it passes, the worker is killed and
replaced and the caller gets "error: timeout"; a worker is always killed with its whole process group. A worker
that dies (CPU or memory limit) is replaced the same way.

    calc = Calculator(workers=1, timeout_s=1.0)
    calc.evaluate("12*7")            -> ToolResult(ok=True, content="84")
    calc.evaluate("1/0")             -> ToolResult(ok=False, content="error: division by zero")
    await calc.aevaluate("2**0.5")   # same, off the event loop
    calc.call("calculator", '{"expression": "12*7"}')   # a parsed tool call -> ToolResult
    calc.close()

`content` is exactly what goes into the tool message (the training data writes errors as "error: <message>").
Workers start lazily and are reused; starting one costs a bare interpreter start (no site, stdlib only;
~20 ms), not counted against the per-call timeout. A `target` other than the calculator must import from the
directory holding `berrylm` (tests use one to show the timeout and limits at work).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TARGET = "berrylm.model.calculator:calculate"
WORKER_MODULE = "berrylm.serve.tools.sandbox"  # this file, run as `python -E -S -B -m` (imports stdlib only)
ROOT = Path(__file__).resolve().parents[3]  # the directory holding the `berrylm` package
MAX_REPLY = 1 << 16  # bytes; a result is at most ~1.3k digits
START_TIMEOUT_S = 15.0


@dataclass
class ToolResult:
    ok: bool
    content: str  # the result ("84") or "error: <short message>"


class _Worker:
    def __init__(self, target: str, cpu_s: int, memory_mb: int, confine: bool = True):
        cmd = [sys.executable, "-E", "-S", "-B", "-m", WORKER_MODULE, target, str(cpu_s), str(memory_mb),
               "1" if confine else "0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.ready = False
        self.dead = False  # saw EOF on its stdout
        self.defences: list[str] = []

    def readline(self, timeout_s: float) -> bytes | None:
        """One reply line, or None on timeout / worker death / oversize reply."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.buf) > MAX_REPLY or not self.sel.select(left):
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:  # EOF: the worker died
                self.dead = True
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def ask(self, expr: str, timeout_s: float) -> list | None:
        if not self.ready:
            line = self.readline(START_TIMEOUT_S)
            try:
                tag, self.defences = json.loads(line) if line is not None else (None, [])
            except ValueError:
                tag = None
            if tag != "ready":
                raise RuntimeError("calculator sandbox failed to start")
            self.ready = True
        try:
            self.proc.stdin.write(json.dumps(expr).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # broken pipe: it died since the last call
            return None
        line = self.readline(timeout_s)
        try:
            return json.loads(line) if line is not None else None
        except ValueError:
            return None

    def kill(self) -> None:
        """Kill the worker's whole process group (its own session: anything it started goes with it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Calculator:
    """A pool of `workers` sandboxed calculator processes. Thread-safe; `aevaluate` for asyncio code."""

    def __init__(self, workers: int = 1, timeout_s: float = 1.0, cpu_s: int = 2, memory_mb: int = 256,
                 target: str = DEFAULT_TARGET, confine: bool = True):
        """confine=False leaves out the privilege drop and the seccomp filter (tests of the process-group kill)."""
        from concurrent.futures import ThreadPoolExecutor

        from berrylm.model.calculator import MAX_CHARS

        if workers < 1 or timeout_s <= 0:
            raise ValueError("Calculator needs workers >= 1 and timeout_s > 0")
        self.timeout_s, self.max_chars = timeout_s, MAX_CHARS
        self._spec = (target, int(cpu_s), int(memory_mb), bool(confine))
        self.defences: list[str] = []  # the layers the last started worker reported
        self._idle: list[_Worker | None] = [None] * workers  # None: not started yet (lazy)
        self._all: set[_Worker] = set()
        self._cv = threading.Condition()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calculator")

    def _spawn(self) -> _Worker:
        w = _Worker(*self._spec)
        with self._cv:
            self._all.add(w)
        return w

    def _note(self, w: _Worker) -> None:
        if w.defences != self.defences:
            self.defences = w.defences
            if "seccomp" not in w.defences:
                import logging

                logging.getLogger("berry.sandbox").warning(
                    "calculator worker runs without its seccomp filter (in force: %s); the AST whitelist, rlimits "
                    "and an empty environment still apply", ", ".join(w.defences) or "none")

    def _discard(self, w: _Worker) -> None:
        w.kill()
        with self._cv:
            self._all.discard(w)

    def evaluate(self, expr: str) -> ToolResult:
        if not isinstance(expr, str):
            return ToolResult(False, "error: expression must be a string")
        if len(expr) > self.max_chars:  # refuse before piping megabytes to a worker
            return ToolResult(False, f"error: expression too long (max {self.max_chars} characters)")
        with self._cv:
            while not self._idle and not self._closed:
                self._cv.wait()
            if self._closed:
                return ToolResult(False, "error: calculator is closed")
            w = self._idle.pop()
        try:
            w = w or self._spawn()
            reply = w.ask(expr, self.timeout_s)
            self._note(w)
        except (RuntimeError, OSError):
            reply = [False, "calculator unavailable"]
            if w is not None:
                self._discard(w)
            w = None
        if reply is None:  # timed out or died: kill it and start a fresh one now (ready by the next call)
            died = w.dead or w.proc.poll() is not None
            self._discard(w)
            w = None if self._closed else self._spawn()
            reply = [False, "resource limit exceeded" if died else "timeout"]
        with self._cv:
            if self._closed and w is not None:
                self._all.discard(w)
                w.kill()
            else:
                self._idle.append(w)
            self._cv.notify()
        ok, content = bool(reply[0]), str(reply[1])
        return ToolResult(ok, content if ok else f"error: {content}")

    async def aevaluate(self, expr: str) -> ToolResult:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._executor, self.evaluate, expr)

    def call(self, name: str, arguments_json: str) -> ToolResult:
        """Run a parsed tool call (OpenAI `function.name` / `function.arguments`)."""
        if name != "calculator":
            return ToolResult(False, f"error: unknown tool {name}")
        try:
            expr = json.loads(arguments_json)["expression"]
        except (ValueError, KeyError, TypeError, RecursionError):
            expr = None
        if not isinstance(expr, str):
            return ToolResult(False, 'error: the calculator needs {"expression": "..."}')
        return self.evaluate(expr)

    async def acall(self, name: str, arguments_json: str) -> ToolResult:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._executor, self.call, name, arguments_json)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
            self._cv.notify_all()
        for w in workers:
            w.kill()
        self._executor.shutdown(wait=False)

    def __enter__(self) -> Calculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


# ----------------------------------------------------------------------------------------- the worker process

def _setlimit(lim: int, soft: int, hard: int | None = None) -> None:
    import resource

    cur = resource.getrlimit(lim)[1]  # an unprivileged process can only lower its hard limit
    cap = (lambda v: v if cur == resource.RLIM_INFINITY else min(v, cur))
    resource.setrlimit(lim, (cap(soft), cur if hard is None else cap(hard)))


def _limit_self(memory_mb: int) -> None:
    import resource

    for lim, val in [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, 8), (resource.RLIMIT_NPROC, 0)]:
        _setlimit(lim, val, val)


def _worker_main(target: str, cpu_s: int, memory_mb: int, confine: bool = True) -> None:
    import importlib
    import math
    import resource

    from berrylm.serve import confine as cf

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes us
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)  # imported with the privileges we started with
    defences = ["session"] if os.getsid(0) == os.getpid() else []
    if set(os.environ) <= {"LC_CTYPE"}:  # Python itself may set LC_CTYPE (PEP 538 locale coercion)
        defences.append("empty-env")
    if confine and cf.drop_privileges():
        defences.append("nobody")
    _limit_self(memory_mb)
    defences.append("rlimits")
    try:  # warm-up: whatever the target imports lazily is imported now, before files can no longer be opened
        fn("1+1")
    except Exception:  # noqa: BLE001
        pass
    if confine and cf.deny_syscalls():
        defences.append("seccomp")
    out = sys.stdout.buffer
    out.write(json.dumps(["ready", defences]).encode() + b"\n")
    out.flush()
    for line in sys.stdin.buffer:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_s
        _setlimit(resource.RLIMIT_CPU, soft)  # soft only: it moves up before every call
        try:
            reply = [True, fn(json.loads(line))]
        except ValueError as e:  # CalcError is a ValueError: its message is for the model
            reply = [False, str(e) or "invalid expression"]
        except MemoryError:
            reply = [False, "resource limit exceeded"]
        except Exception:  # noqa: BLE001 - whatever happens, the answer is one short line
            reply = [False, "calculator failed"]
        out.write(json.dumps(reply).encode() + b"\n")  # ASCII only (ensure_ascii)
        out.flush()


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:5] != ["0"])
