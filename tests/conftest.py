"""Shared fixtures: a tokenizer trained on the fixture corpus, and tiny random checkpoints of both
architectures written with the real checkpoint writer; the `gpu` marker and the CI rule that a skip is a failure."""

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


# Random init scale of the test models. At the presets' init_std (0.02) a tiny model with tied embeddings echoes
# its last input token forever (greedy output "\n\n\n..."), so stop strings and batching would compare a
# repeated token with itself; at these scales greedy output varies (measured: 18-24 distinct tokens in 24).
VARIED_INIT_STD = {"llama": 0.2, "hybrid": 0.3}


def make_checkpoint(path: Path, tokenizer, preset: str = "berry-1.8m", seed: int = 0, **overrides) -> Path:
    """A small random model of `preset`'s architecture (shrunk unless overridden), saved as a checkpoint; its
    init_std (unless given) makes greedy decoding produce varied tokens (VARIED_INIT_STD)."""
    from berrylm.model.checkpoint import save_checkpoint

    return save_checkpoint(path, make_model(tokenizer, preset, seed, **overrides), tokenizer)


def make_model(tokenizer, preset: str = "berry-1.8m", seed: int = 0, **overrides):
    """The model `make_checkpoint` saves (same seed, same weights), for comparing a round trip with the original."""
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    small = dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, ffn_dim=128, head_dim=16, max_seq_len=512)
    if get_preset(preset).n_experts:
        small.update(expert_dim=32, ffn_dim=0)
    if get_preset(preset).n_linear_heads:
        small.update(n_heads=4, n_kv_heads=1, n_linear_heads=2, init_std=VARIED_INIT_STD["hybrid"])
    else:
        small.update(n_heads=4, n_kv_heads=2, init_std=VARIED_INIT_STD["llama"])
    small.update(overrides)
    cfg = get_preset(preset, **small)
    torch.manual_seed(seed)
    return Transformer(cfg)


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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; the only tests allowed to skip under CI=true")


def _in_ci() -> bool:
    import os

    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails, unless it is marked `gpu` (its tool cannot exist on a CPU runner):
    a missing peer (Chromium, llama.cpp's wheel, a download) must show, not pass silently."""
    outcome = yield
    rep = outcome.get_result()
    if _in_ci() and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("gpu") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome, rep.longrepr = "failed", f"skipped under CI=true (only `gpu` tests may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (pytest.skip(allow_module_level=True), importorskip)."""
    outcome = yield
    rep = outcome.get_result()
    if _in_ci() and rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome, rep.longrepr = "failed", f"module skipped under CI=true: {reason}"


def pytest_collection_modifyitems(config, items):
    """Triton kernel tests run compiled in this process when a CUDA GPU is present; otherwise only inside the
    TRITON_INTERPRET=1 subprocess that `test_all_under_interpreter` starts, so in the ordinary CPU run they are
    deselected (not skipped: that subprocess runs every one of them), and where they do run here the wrapper is."""
    import os

    here = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    kernel = [i for i in items if i.path.name == "test_triton_kernels.py"]
    drop = [i for i in kernel if (i.name == "test_all_under_interpreter") == here]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if i not in drop]


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
