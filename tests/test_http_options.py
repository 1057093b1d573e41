"""Browser and proxy options on the real server (the shared fixture runs with --cors-origin http://app.example,
--sse-ping-interval 0.25 and --access-log): CORS preflights and headers for the allowed origin only, X-Request-Id
echoed or made up and written to the access log, and SSE keep-alive comments while a stream is silent."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from berrylm.serve.http_options import HttpOptions

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


def test_sse_pings_while_a_stream_is_silent():
    async def slow():
        yield "data: 1\n\n"
        await asyncio.sleep(0.35)
        yield "data: 2\n\n"

    async def run(interval: float) -> list[str]:
        return [x async for x in HttpOptions(sse_ping_interval=interval).keepalive(slow())]

    assert asyncio.run(run(0.1)).count(": ping\n\n") >= 2
    out = asyncio.run(run(0.1))
    assert [x for x in out if x != ": ping\n\n"] == ["data: 1\n\n", "data: 2\n\n"]
    assert asyncio.run(run(0)) == ["data: 1\n\n", "data: 2\n\n"]

    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.05)
                yield "data: x\n\n"
        finally:
            closed.append(True)

    async def leave_early():
        gen = HttpOptions(sse_ping_interval=0.02).keepalive(endless())
        async for _ in gen:
            break
        await gen.aclose()  # what Starlette does when the client goes away

    asyncio.run(leave_early())
    assert closed == [True]  # the inner stream was closed: its finally aborts the engine requests


def test_live_stream_passes_through_keepalive_intact(api_server):
    base = api_server[0]
    body = {**CHAT, "stream": True, "max_tokens": 20, "temperature": 0}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith(("data: ", ": ping")) for ln in lines)
