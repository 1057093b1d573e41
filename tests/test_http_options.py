"""Browser and proxy options on the real server (the shared fixture runs with --cors-origin http://app.example,
--sse-ping-interval 0.25 and --access-log): CORS preflights and headers for the allowed origin only, X-Request-Id
echoed or made up and written to the access log, and SSE keep-alive comments while a stream is silent."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from berrylm.serve.http_options import PING

CHAT = {"model": "berry-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_cors_for_the_allowed_origin_only(api_server):
    base = api_server[0]
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(base + "/v1/chat/completions", headers=pre, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"Origin": "http://app.example"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.options(base + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"}, timeout=60)
    assert "access-control-allow-origin" not in r.headers


def test_request_id_echoed_generated_and_logged(api_server):
    base, log, _ = api_server
    r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-42.a"}, timeout=60)
    assert r.headers["x-request-id"] == "trace-42.a"
    made = httpx.get(base + "/v1/models", timeout=30).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    bad = httpx.get(base + "/health", headers={"X-Request-Id": "has spaces\tand tabs"}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])  # not echoed into logs as given
    err = httpx.post(base + "/v1/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "e-1"}, timeout=30)
    assert err.status_code == 400 and err.headers["x-request-id"] == "e-1"
    deadline = time.time() + 10
    while time.time() < deadline and not all(
            any(f"request_id={i}" in line for line in log) for i in ("trace-42.a", made, "e-1")):
        time.sleep(0.1)
    lines = "".join(log)
    assert re.search(r'"POST /v1/chat/completions" 200 [0-9.]+ms request_id=trace-42\.a', lines), lines[-2000:]
    assert '"GET /v1/models" 200' in lines and f"request_id={made}" in lines
    assert re.search(r'"POST /v1/chat/completions" 400 [0-9.]+ms request_id=e-1', lines)


def test_sse_pings_while_a_stream_is_silent(llama_checkpoint):
    """Server.deltas with ping: a delta queue silent for 0.35 s yields keep-alives (None), which the chat stream
    writes as SSE comment lines; the deltas themselves arrive intact and in order. (A live stream is never quiet
    for long enough on its own to test this against the server.)"""
    from starlette.requests import Request

    from berrylm.model.checkpoint import load_checkpoint
    from berrylm.serve.backend import TorchBackend
    from berrylm.serve.engine import Engine, EngineConfig
    from berrylm.serve.models import ModelRegistry, ServedModel
    from berrylm.serve.responses import ChoiceAggregator, chat_stream
    from berrylm.serve.sequence import Delta
    from berrylm.serve.server import Server

    model = ServedModel("tiny", Engine(TorchBackend(*load_checkpoint(llama_checkpoint)), EngineConfig()))
    srv = Server(ModelRegistry([model]))

    async def never():
        await asyncio.sleep(3600)

    async def run(ping: float) -> list[str]:
        q: asyncio.Queue = asyncio.Queue()

        async def feed():
            await asyncio.sleep(0.05)
            q.put_nowait(Delta("r", 0, "Hel", completion_tokens=1))
            await asyncio.sleep(0.35)
            q.put_nowait(Delta("r", 0, "lo", completion_tokens=2, finish_reason="stop"))

        task = asyncio.create_task(feed())
        deltas = srv.deltas(model, ["r"], q, 1, Request({"type": "http"}, receive=never), ping=ping)
        out = [x async for x in chat_stream(deltas, ChoiceAggregator(1, 3), {"id": "x", "model": "tiny"}, False,
                                            lambda outs: None)]
        await task
        return out

    out = asyncio.run(run(0.1))
    assert out.count(PING) >= 2
    texts = [json.loads(x[6:])["choices"][0]["delta"].get("content") for x in out if x.startswith("data: {")]
    assert "".join(t or "" for t in texts) == "Hello" and out[-1] == "data: [DONE]\n\n"
    assert PING not in asyncio.run(run(0))


def test_live_stream_passes_through_keepalive_intact(api_server):
    base = api_server[0]
    body = {**CHAT, "stream": True, "max_tokens": 20, "temperature": 0}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith(("data: ", ": ping")) for ln in lines)
