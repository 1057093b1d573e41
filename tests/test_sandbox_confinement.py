"""Defence in depth behind the calculator's AST whitelist: code running inside the worker (tests/sandbox_probe.py, a
test-only target that execs anything) cannot open files for reading or writing, truncate, open sockets, start
processes, signal or read other processes, and runs with an empty environment, as `nobody` when started as root; a
worker is killed with its whole process group; the server's API key reaches no child process."""

from __future__ import annotations

import errno
import os
import platform
import time
from pathlib import Path

import httpx
import pytest

from berrylm.serve.tools.sandbox import Calculator
from tests.test_server import _children, _start, _stop

PROBE = "tests.sandbox_probe:run"
SECCOMP = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")


@pytest.fixture(scope="module")
def calc():
    with Calculator(workers=1, timeout_s=5.0, target=PROBE) as c:
        yield c


def _probe(calc, code: str) -> str:
    r = calc.evaluate(code)
    assert r.ok, r
    return r.content


def test_worker_reports_its_defences(calc):
    assert _probe(calc, "result = 1") == "1"
    want = {"session", "empty-env", "rlimits"} | ({"seccomp"} if SECCOMP else set())
    want |= {"nobody"} if os.geteuid() == 0 else set()
    assert set(calc.defences) == want, calc.defences
    if not SECCOMP:
        print(f"\nno seccomp filter on {platform.system()} {platform.machine()}: the other layers are tested")


@pytest.mark.skipif(not SECCOMP, reason="the seccomp filter exists on Linux x86-64 and aarch64 only")
def test_worker_cannot_touch_files_network_or_processes(calc, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)  # writable by anyone: only the filter stands in the way
    tmp_path.chmod(0o777)
    eperm = f"OSError {errno.EPERM}"
    probes = {
        "write a new file": f"open({str(tmp_path / 'new.txt')!r}, 'w')",
        "truncate a file": f"os.truncate({str(victim)!r}, 0)",
        "open for writing": f"open({str(victim)!r}, 'r+')",
        "read a file": f"open({str(victim)!r}).read()",
        "read the server's environ": "open(f'/proc/{os.getppid()}/environ').read()",
        "remove a file": f"os.unlink({str(victim)!r})",
        "make a directory": f"os.mkdir({str(tmp_path / 'd')!r})",
        "open a socket": "socket.socket()",
        "connect to localhost": "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 1))",
        "fork": "os.fork()",
        "run a program": "subprocess.run(['true'])",
        "signal the server": "os.kill(os.getppid(), 0)",
    }
    for what, code in probes.items():
        assert _probe(calc, code) == eperm, what
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    assert _probe(calc, "result = sorted(set(os.environ) - {'LC_CTYPE'})") == "[]"
    assert _probe(calc, "result = os.getsid(0) == os.getpid()") == "True"
    if os.geteuid() == 0:
        assert _probe(calc, "result = (os.getuid(), os.getgid(), os.getgroups())") in ("(65534, 65534, [])",
                                                                                    "(65534, 65533, [])")
    assert _probe(calc, "result = 6*7") == "42"  # and the worker still works


def test_worker_is_killed_with_its_process_group(tmp_path):
    """Without the filter (confine=False) a worker can fork; a timeout kills the grandchild with it."""
    with Calculator(workers=1, timeout_s=2.0, target=PROBE, confine=False) as c:
        code = ("pid = os.fork()\n"
                "if pid == 0:\n    time.sleep(600)\n    os._exit(0)\n"
                "result = pid")
        out = _probe(c, code)
        if not out.isdigit():  # as non-root, RLIMIT_NPROC = 0 already refuses the fork
            assert os.geteuid() != 0 and out.startswith("OSError"), out
            return
        grandchild = int(out)
        assert Path(f"/proc/{grandchild}").exists()
        assert c.evaluate("spin").content == "error: timeout"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(grandchild):
            time.sleep(0.05)
        assert not _alive(grandchild), "the worker's grandchild outlived it"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_api_key_reaches_no_child_process(llama_checkpoint, tokenizer):
    """Started with BERRY_API_KEY, the server keeps it to itself: the engine process and the calculator worker (made
    to run by a forced tool call) do not have it in their environment."""
    key = "sk-secret-" + os.urandom(8).hex()
    proc, base = _start_with_env(llama_checkpoint, {**os.environ, "BERRY_API_KEY": key})
    try:
        call = tokenizer.encode('<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>')
        r = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"messages": [{"role": "user", "content": "what is 12*7?"}], "max_tokens": len(call) + 2,
                             "forced_tokens": call})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["builtin_tool_calls"][0]["output"] == "84"
        engines = _children(proc.pid)
        workers = [w for e in engines for w in _children(e)]
        assert engines and workers
        for pid in engines + workers:
            assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    finally:
        _stop(proc)


def _start_with_env(ckpt, env):
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return _start(ckpt)
    finally:
        os.environ.clear()
        os.environ.update(old)

