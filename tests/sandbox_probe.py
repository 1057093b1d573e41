"""A test-only calculator-worker target that runs arbitrary Python (tests/test_sandbox_confinement.py): what code
that escaped the calculator's AST whitelist could do inside the worker. Never a server target: the server only
starts workers on serve.tools.calculator:calculate."""

from __future__ import annotations

import os
import socket
import subprocess
import time

_ = (os, socket, subprocess, time)  # imported before the seccomp filter, as anything the worker has loaded


def run(code: str) -> str:
    """exec code; -> the value it stored in `result`, or "OSError <errno>" / the exception's type name."""
    if code == "1+1":  # the worker's warm-up call
        return "2"
    if code == "spin":
        while True:
            pass
    ns: dict = {}
    try:
        exec(code, globals(), ns)  # noqa: S102 - the point of this test target
    except OSError as e:
        return f"OSError {e.errno}"
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return str(ns.get("result"))
