"""No request body can freeze the server: size limit (413), character budget before tokenizing, parsing/templating/
tokenization off the event loop with a time bound, responses serialized off the loop; and errors stay clean on a
keep-alive connection. The real server runs in a subprocess (tests/test_server.py's helpers)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import threading
import time

import httpx
import pytest

from tests.test_server import _start, _stop

MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(llama_checkpoint):
    proc, base = _start(llama_checkpoint, "--max-model-len", "256", "--max-request-bytes", str(1 << 20))
    yield base
    _stop(proc)


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_body_limit_413_and_connection_survives(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
        r = c.post(CHAT, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and _error(r)["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted while it streams in
            for _ in range(40):
                yield b" " * 65536

        r = c.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    with httpx.Client(base_url=server, timeout=60) as c:  # keep-alive: an error never resets the next request
        for body in ({"messages": MSG, "logit_bias": {"²": 1}}, {"messages": MSG, "logit_bias": {"--1": 1}},
                     {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                     {"messages": MSG, "max_tokens": "10"}, {"messages": MSG, "n": True},
                     {"messages": MSG, "seed": 2**63}, {"messages": MSG, "top_k": 2**63}):
            r = c.post(CHAT, json=body)
            assert r.status_code == 400, body
            assert _error(r)["param"] and "pydantic" not in r.text
            ok = c.post(CHAT, json={"messages": MSG, "max_tokens": 2})
            assert ok.status_code == 200
        r = c.post(CHAT, content=b'{"messages": [1, 2', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and _error(r)["param"] is None  # not a character offset
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": 2, "seed": 2**63 - 1, "n": 2, "top_k": 2**62})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_character_budget_refuses_before_tokenizing(server):
    r = httpx.post(server + CHAT, json={"messages": [{"role": "user", "content": "word " * 180_000}]}, timeout=60)
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"


def _attack(server: str, hostile: list[tuple[str, dict]], stop, statuses) -> None:
    """One attacker process: post the hostile bodies in turn until `stop` is set."""
    bodies = [(path, json.dumps(body).encode()) for path, body in hostile]
    with httpx.Client(base_url=server, timeout=120) as c:
        i = 0
        while not stop.is_set():
            path, raw = bodies[i % len(bodies)]
            i += 1
            statuses.append(c.post(path, content=raw, headers={"Content-Type": "application/json"}).status_code)


def _gaps_while(server, hostile: list[tuple[str, dict]], seconds: float) -> tuple[list[float], list[float], list]:
    """Stream one long completion and poll /health while `hostile` bodies are posted in a loop by 3 attacker
    processes (processes, so the client's own GIL does not add to what is measured)
    -> (inter-chunk gaps of the stream, /health latencies, statuses of the hostile requests)."""
    ctx = multiprocessing.get_context("spawn")
    gaps, health = [], []
    stop, manager = ctx.Event(), ctx.Manager()
    statuses = manager.list()
    attackers = [ctx.Process(target=_attack, args=(server, hostile, stop, statuses), daemon=True) for _ in range(3)]
    for a in attackers:
        a.start()
    done = threading.Event()

    def poll():
        with httpx.Client(base_url=server, timeout=120) as c:
            while not done.is_set():
                t = time.monotonic()
                assert c.get("/health").status_code == 200
                health.append(time.monotonic() - t)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    try:
        with httpx.Client(base_url=server, timeout=120) as c:
            body = {"messages": MSG, "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
            while not statuses:  # the attack is under way (spawned processes take a while to start)
                time.sleep(0.05)
            poller.start()
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                with c.stream("POST", CHAT, json=body) as r:
                    last = None
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.monotonic()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
    finally:
        stop.set()
        done.set()
        for a in attackers:
            a.join(timeout=120)
        if poller.is_alive():
            poller.join(timeout=120)
        out = list(statuses)
        manager.shutdown()
    return gaps, health, out


def test_hostile_bodies_do_not_stall_streams_or_health(server):
    hostile = [
        (CHAT, {"messages": [{"role": "user", "content": "y" * 1_000_000}]}),  # just under the body limit
        (CHAT, {"messages": MSG * 4096, "max_tokens": 1}),
        (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {
            "type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(60)}}}} for i in range(128)]}),
        (CHAT, {"messages": MSG, "n": 16, "logprobs": True, "top_logprobs": 20, "max_tokens": 64, "ignore_eos": True}),
        (CHAT, {"messages": MSG, "logit_bias": {str(i): 100 for i in range(300)}, "n": 16, "max_tokens": 16}),
        ("/v1/completions", {"prompt": "z" * 1_000_000}),
    ]
    gaps, health, statuses = _gaps_while(server, hostile, seconds=8.0)
    assert len(gaps) > 50 and health and len(statuses) > 6
    assert set(statuses) <= {200, 400, 413}, statuses
    gaps.sort()
    health.sort()
    p99 = gaps[int(len(gaps) * .99)]
    print(f"\nstream gaps: median {gaps[len(gaps) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {gaps[-1] * 1e3:.1f} ms; /health max {health[-1] * 1e3:.1f} ms; {len(statuses)} hostile requests")
    # Guards against the stalls, not a speed measurement: the freezes this catches lasted 3.6-22 s, and full garbage
    # collections of the start-up heap (serve/guard.py: freeze_heap) made a p99 of 125-150 ms. On an otherwise idle
    # 2-core box the p99 measured 58-61 ms (under the 100 ms bar); with the box's load average at 4.4 it
    # was 173 ms, so the bound here leaves room for a busy CI machine. bench/soak.py reports the figure.
    assert p99 < 0.5
    assert gaps[-1] < 1.0 and health[-1] < 1.0


def test_costly_template_is_cut_off_and_sigterm_still_works(tmp_path, llama_checkpoint):
    ckpt = tmp_path / "slow-template"
    shutil.copytree(llama_checkpoint, ckpt)
    (ckpt / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}")
    proc, base = _start(ckpt, "--prepare-timeout", "1")
    try:
        t = time.monotonic()
        r = httpx.post(base + CHAT, json={"messages": MSG}, timeout=60)
        assert r.status_code == 400 and _error(r)["code"] == "prompt_too_costly"
        assert time.monotonic() - t < 30  # a hang guard (the render is cut at 1 s); the 400 above is the check
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        r = httpx.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200  # the interrupted render left nothing behind
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) is not None
    finally:
        _stop(proc)
