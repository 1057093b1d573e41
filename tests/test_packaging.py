"""Packaging: berrylm installs as ONE top-level package `berrylm` (berrylm.model, berrylm.serve, ...) and works from
a non-editable wheel in a fresh venv: `berry info berry-chat`, the calculator's `python -E -S` sandbox worker, and
`berry serve` answering one request. Also: `python -m berrylm` is the same command line as `berry`.

The fresh venv takes torch from this machine's configured wheel (TORCH, default torch==2.13.0, the Makefile's pin)
and the other dependencies through pip's cache, so it costs about a minute, not a download."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import wait_healthy

REPO = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("TORCH", "torch==2.13.0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_dash_m_berrylm_is_the_berry_command_line():
    r = subprocess.run([sys.executable, "-m", "berrylm", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for command in ("data", "train", "export", "serve", "chat", "ui", "bench", "info"):
        assert command in r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of what the wheel is made of: setuptools builds in the source tree, and a build/ left
    # there would carry files since moved or deleted into the wheel
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "berrylm", src / "berrylm", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(dist), str(src)], capture_output=True, text=True, cwd=dist)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = dist.glob("berrylm-*.whl")
    return whl


def test_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"berrylm", "berrylm-0.1.0.dist-info"}, tops
    for needed in ("berrylm/__main__.py", "berrylm/serve/tools/sandbox.py", "berrylm/model/chat_template.jinja",
                   "berrylm/model/embedded/berry-chat/model.safetensors"):
        assert needed in names
    entry_points = zipfile.ZipFile(wheel).read("berrylm-0.1.0.dist-info/entry_points.txt").decode()
    assert "berry = berrylm.cli:run" in entry_points


@pytest.mark.timeout(900)
def test_wheel_installs_and_serves_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
    env["PATH"] = os.pathsep.join([str(bin_dir)] + [p for p in env["PATH"].split(os.pathsep) if ".venv" not in p])
    for args in ([TORCH], [str(wheel)]):
        r = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile", *args],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    home = tmp_path / "home"  # outside the source tree: only the installed package can be imported
    home.mkdir()

    r = subprocess.run([str(bin_dir / "python"), "-c", "import berrylm.model, berrylm.serve.tools.sandbox as s; "
                        "print(berrylm.model.__file__); print(s.Calculator().evaluate('12*7'))"],
                       capture_output=True, text=True, env=env, cwd=home, timeout=120)
    assert r.returncode == 0, r.stderr
    where, result = r.stdout.splitlines()
    assert where.startswith(str(env_dir)) and "site-packages" in where
    assert result == "ToolResult(ok=True, content='84')"  # the -E -S sandbox worker found the installed package

    r = subprocess.run([str(bin_dir / "berry"), "info", "berry-chat"], capture_output=True, text=True, env=env,
                       cwd=home, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "model.safetensors" in r.stdout and str(env_dir) in r.stdout

    port = free_port()
    proc = subprocess.Popen([str(bin_dir / "berry"), "serve", "berry-chat", "--port", str(port)], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base)
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=48, temperature=0,
                                               messages=[{"role": "user", "content": "What is 12 times 7?"}])
        # greedy berry-chat calls the built-in calculator (the sandbox worker of the installed package) here
        assert "84" in reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
