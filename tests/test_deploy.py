"""The Docker image, checked without a Docker daemon: hadolint, and the image's own install and start steps
(the Dockerfile's COPY set, deploy/install.sh, ENV, ENTRYPOINT and HEALTHCHECK) run in a fresh venv."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    ins = instructions(DOCKERFILE)
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_has_what_an_edge_image_needs():
    ins = instructions(DOCKERFILE)
    words = [w for w, _ in ins]
    assert words.count("FROM") >= 2  # multi-stage
    stage = dict(runtime_stage())
    assert stage["EXPOSE"] == "8000" and "HEALTHCHECK" in stage and "/health" in stage["HEALTHCHECK"]
    assert stage["USER"].split(":")[0] not in ("0", "root")
    assert json.loads(stage["ENTRYPOINT"])[:4] == ["berry", "serve", "--host", "0.0.0.0"]
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE  # CPU-only torch, never a CUDA build
    assert (REPO / ".dockerignore").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_image_install_and_start_steps_work_without_docker(tmp_path):
    # 1. the build context the Dockerfile sees: exactly its COPY sources
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for word, args in instructions(DOCKERFILE):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for src in sources:
                s = REPO / src.rstrip("/")
                if s.is_dir():
                    shutil.copytree(s, ctx / src.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(s, ctx / src)
    # 2. the install step (same script; torch from this machine's configured index instead of the CPU index)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    r = subprocess.run(["sh", "deploy/install.sh", str(venv)], cwd=ctx, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # 3. the runtime stage's ENV and ENTRYPOINT, from a directory outside the source tree
    stage = runtime_stage()
    run_env = dict(env, PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    for word, args in stage:
        if word == "ENV":
            for k, v in re.findall(r"(\w+)=(\S+)", args):
                run_env[k] = v.replace("$PATH", run_env["PATH"]).replace("/opt/venv", str(venv))
    entry = json.loads(dict(stage)["ENTRYPOINT"])
    port = free_port()
    entry = [str(venv / "bin" / entry[0])] + entry[1:]
    entry[entry.index("--port") + 1] = str(port)
    entry[entry.index("--host") + 1] = "127.0.0.1"  # same code path; loopback only in tests
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen(entry, cwd=home, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("server never became healthy")
        # the image's HEALTHCHECK command, run with the image's python
        hc = json.loads(dict(stage)["HEALTHCHECK"].split("CMD", 1)[1].strip())
        assert subprocess.run([str(venv / "bin" / hc[0]), *hc[1:]], env=run_env).returncode == 0
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16,
                                               messages=[{"role": "user", "content": "Hello!"}], temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert "site-packages" in subprocess.run([str(venv / "bin" / "python"), "-c",
                                                   "import model; print(model.__file__)"],
                                                  capture_output=True, text=True, cwd=home).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
