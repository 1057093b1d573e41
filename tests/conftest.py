"""Shared fixtures: a tokenizer trained on the fixture corpus, and tiny random checkpoints of both
architectures written with the real checkpoint writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_texts() -> list[str]:
    text = (FIXTURES / "tiny_corpus.txt").read_text()
    return [p for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def tokenizer():
    from berrylm.train.data.tokenizer import train_bpe

    return train_bpe(fixture_texts(), vocab_size=512)


def make_checkpoint(path: Path, tokenizer, preset: str = "berry-1.8m", seed: int = 0, **overrides) -> Path:
    """A small random model of `preset`'s architecture (shrunk unless overridden), saved as a checkpoint."""
    from berrylm.model.checkpoint import save_checkpoint
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    small = dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, ffn_dim=128, head_dim=16, max_seq_len=512)
    if get_preset(preset).n_experts:
        small.update(expert_dim=32, ffn_dim=0)
    if get_preset(preset).n_linear_heads:
        small.update(n_heads=4, n_kv_heads=1, n_linear_heads=2)
    else:
        small.update(n_heads=4, n_kv_heads=2)
    small.update(overrides)
    cfg = get_preset(preset, **small)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return save_checkpoint(path, model, tokenizer)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", tokenizer, "berry-1.8m")


@pytest.fixture(scope="session")
def hybrid_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-strawberry", tokenizer, "strawberry-1.8m")


def wait_healthy(proc, base: str, timeout: float = 180.0) -> None:
    """Poll base/health until 200; fail with the server's output if it exits first, or after `timeout` s
    (a bound against hangs, not a timing assertion)."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("server never became healthy")


def pytest_collection_modifyitems(config, items):
    """Triton kernel tests run compiled in this process when a CUDA GPU is present; otherwise only inside the
    TRITON_INTERPRET=1 subprocess that `test_all_under_interpreter` starts, so in the ordinary CPU run they are
    deselected (not skipped: that subprocess runs every one of them)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return
    inner = [i for i in items if i.path.name == "test_triton_kernels.py" and i.name != "test_all_under_interpreter"]
    if inner:
        config.hook.pytest_deselected(items=inner)
        items[:] = [i for i in items if i not in inner]


@pytest.fixture(scope="session")
def api_server(llama_checkpoint):
    """One `berry serve` of two models for the API-completeness tests (structured output, tokenize, responses,
    lm-eval, several models, CORS / SSE pings / request ids): the embedded berry-chat as "berry-chat" and the tiny
    random llama as "tiny", each with its own engine process.
    Yields (base URL, the server's output lines so far, its pid)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "berrylm", "serve", "berry-chat", str(llama_checkpoint),
                             "--served-model-name", "berry-chat", "--served-model-name", "tiny", "--port", str(port),
                             "--threads", "1", "--max-model-len", "512", "--cors-origin", "http://app.example",
                             "--sse-ping-interval", "0.25", "--access-log"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    log: list[str] = []  # the server's output, read as it comes (an unread pipe would block the access log)
    import threading

    def read() -> None:
        for line in proc.stdout:
            log.append(line.decode(errors="replace"))

    try:
        wait_healthy(proc, base)
        threading.Thread(target=read, daemon=True).start()
        yield base, log, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
