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
from pathlib import Path

import pytest

from tests.conftest import wait_healthy

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


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions, a stage built FROM another one starting with that one's instructions."""
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for word, args in instructions(DOCKERFILE):
        if word == "FROM":
            parts = args.split()
            name = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else f"stage{len(out)}"
            out[name] = list(out.get(parts[0], [])) + [(word, args)]
        elif name is not None:
            out[name].append((word, args))
    return out


def runtime_stage(target: str | None = None) -> list[tuple[str, str]]:
    """The image a target builds (default: the last stage, what `docker build` builds without --target)."""
    all_stages = stages()
    return all_stages[target or list(all_stages)[-1]]


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("target", [None, "onnx"])
def test_dockerfile_has_what_an_edge_image_needs(target):
    ins = instructions(DOCKERFILE)
    words = [w for w, _ in ins]
    assert words.count("FROM") >= 2  # multi-stage
    stage = dict(runtime_stage(target))  # (a later instruction of a word wins, as in the built image)
    assert stage["EXPOSE"] == "8000" and "HEALTHCHECK" in stage and "/health" in stage["HEALTHCHECK"]
    assert stage["USER"].split(":")[0] not in ("0", "root")
    entry = json.loads(stage["ENTRYPOINT"])
    assert entry[:4] == ["berry", "serve", "--host", "0.0.0.0"]
    assert ("--backend" in entry) == (target == "onnx")
    assert target is None or entry[entry.index("--backend") + 1] == "onnx"
    assert "BERRY_MODEL" in stage_env(runtime_stage(target))
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE  # CPU-only torch, never a CUDA build
    assert (REPO / ".dockerignore").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", [None, "onnx"])
def test_image_install_and_start_steps_work_without_docker(tmp_path, target):
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
    # (the onnx target's build stage runs it a second time on the same venv, adding onnxruntime + the export)
    for extra in ([], ["onnx"]) if target == "onnx" else ([],):
        r = subprocess.run(["sh", "deploy/install.sh", str(venv), *extra], cwd=ctx, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # 3. the runtime stage's ENV and ENTRYPOINT, from a directory outside the source tree
    stage = runtime_stage(target)
    run_env = dict(env, PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    args = {"BERRY_EXPORT": "berry-chat"}  # the Dockerfile's ARG defaults
    for k, v in stage_env(stage).items():
        v = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v)
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

        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base)
        # the image's HEALTHCHECK command, run with the image's python
        hc = json.loads(dict(stage)["HEALTHCHECK"].split("CMD", 1)[1].strip())
        hc = [a.replace(":8000/", f":{port}/") for a in hc]  # the test server listens on a free port
        assert subprocess.run([str(venv / "bin" / hc[0]), *hc[1:]], env=run_env).returncode == 0
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16,
                                               messages=[{"role": "user", "content": "Hello!"}], temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert "site-packages" in subprocess.run([str(venv / "bin" / "python"), "-c",
                                                   "import berrylm.model; print(berrylm.model.__file__)"],
                                                  capture_output=True, text=True, cwd=home).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
