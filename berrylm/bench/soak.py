"""Soak test: many streams, cancellations and hostile requests against one `berry serve`, for a bounded time.

    python -m berrylm.bench.soak [--model MODEL] [--streams 64] [--minutes 10] [--out FILE.md]

`--streams` client loops run until the time is up; each iteration is, at random, a streamed chat completion of a
random length read to the end (70%), one cancelled after a few chunks (15%), or a hostile request (15%: wrong types,
junk logit_bias keys, a body over the size limit, deeply nested JSON, n=16 with top_logprobs=20, thousands of
messages, a forced deeply nested tool call). It reports the outcomes by cause (a hostile request answered 4xx is
expected; any 5xx, error event, reset or timeout is the server's fault), p50/p99/max inter-token latency of the
streams read to the end (between chunks of content: not the prefill before the first token, nor the hidden tokens of
a built-in calculator call), the RSS of the server's processes sampled over time, and at the end, once idle, the
running sequences and KV blocks in use from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

from berrylm.bench.serve import free_port, start, stop

PROMPTS = ["Tell me a story about a fox.", "What is 12 times 7?", "Explain rain to a child.", "Say hello.",
           "What is 1234*5678?", "Write a short poem about the sea."]
MSG = [{"role": "user", "content": "hi"}]


def hostile_bodies() -> list[tuple[str, bytes]]:
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    return [
        ("max_tokens as a string", j({"messages": MSG, "max_tokens": "10"})),
        ("seed 2^63", j({"messages": MSG, "seed": 2**63, "n": 2})),
        ("top_k 2^63", j({"messages": MSG, "top_k": 2**63})),
        ("logit_bias '²'", j({"messages": MSG, "logit_bias": {"²": 1}})),
        ("content part text 5", j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})),
        ("5 MB body", j({"messages": [{"role": "user", "content": "x" * (5 << 20)}]})),
        ("nested JSON", b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
        ("n=16 top_logprobs=20", j({"messages": MSG, "n": 16, "logprobs": True, "top_logprobs": 20, "max_tokens": 32})),
        ("3000 messages", j({"messages": MSG * 3000, "max_tokens": 1})),
        ("300 logit_bias entries", j({"messages": MSG, "n": 4, "max_tokens": 16,
                                      "logit_bias": {str(i): 100 for i in range(300)}})),
        ("not JSON", b"\x00\xffnot json"),
    ]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _rss_mb(pid: int) -> dict[str, float]:
    """name (pid) -> VmRSS in MB of pid and its descendants."""
    out = {}
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
        role = ("engine" if "spawn_main" in cmd else "calculator" if "sandbox" in cmd else "http" if p == pid
                else "other")
        out[f"{role} ({p})"] = kb / 1024
    return out


async def soak(base: str, pid: int, streams: int, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    gaps: list[float] = []
    rss: list[tuple[float, dict]] = []
    hostile = hostile_bodies()
    t0 = time.monotonic()
    end = t0 + seconds

    async def one_stream(c: httpx.AsyncClient, cancel_after: int | None) -> None:
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                "max_tokens": rng.randint(1, 200), "temperature": rng.choice([0, 0.7, 1.0])}
        last, n, mine = None, 0, []
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                outcomes[f"stream: HTTP {r.status_code}" + (" (server fault)" if r.status_code >= 500 else "")] += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if line.startswith('data: {"error"'):
                    outcomes["stream: error event (server fault)"] += 1
                    return
                now = time.monotonic()
                delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                if "role" in delta or "builtin_tool_calls" in delta:
                    # not a gap between tokens: before the first token is the prompt's prefill, and before a
                    # built-in call's result chunk the model wrote the call (tokens the client does not see)
                    last = None
                elif delta.get("content"):
                    if last is not None:
                        mine.append(now - last)
                    last = now
                n += 1
                if cancel_after is not None and n >= cancel_after:
                    outcomes["stream: cancelled by the client"] += 1
                    return
        gaps.extend(mine)
        outcomes["stream: completed"] += 1

    async def one_hostile(c: httpx.AsyncClient) -> None:
        name, raw = rng.choice(hostile)
        r = await c.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        fault = " (server fault)" if r.status_code >= 500 else ""
        outcomes[f"hostile {name}: HTTP {r.status_code}{fault}"] += 1

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            while time.monotonic() < end:
                x = rng.random()
                try:
                    if x < 0.70:
                        await one_stream(c, None)
                    elif x < 0.85:
                        await one_stream(c, rng.randint(1, 5))
                    else:
                        await one_hostile(c)
                except (httpx.TransportError, httpx.TimeoutException) as e:
                    outcomes[f"{type(e).__name__} (server fault)"] += 1

    lags: list[float] = []

    async def client_lag() -> None:  # how late this client's own event loop wakes: delay not caused by the server
        while time.monotonic() < end:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    async def sample_rss() -> None:
        while time.monotonic() < end:
            rss.append((time.monotonic() - t0, _rss_mb(pid)))
            await asyncio.sleep(max(1.0, seconds / 20))

    await asyncio.gather(sample_rss(), client_lag(), *[client_loop() for _ in range(streams)])
    await asyncio.sleep(2.0)  # let aborted sequences be freed
    rss.append((time.monotonic() - t0, _rss_mb(pid)))
    metrics = httpx.get(base + "/metrics", timeout=30).text
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("berry_kv_cache_usage{", "berry_running{", "berry_queue_depth{")):  # {model="..."}
            k, v = line.split()
            values[k.split("{")[0]] = float(v)
    return {"outcomes": outcomes, "gaps": sorted(gaps), "lags": sorted(lags), "rss": rss, "end": values,
            "health": httpx.get(base + "/health", timeout=30).json()}


def report(res: dict, args, cmd: str, wall: float) -> str:
    g = res["gaps"]
    q = lambda p: g[min(len(g) - 1, int(len(g) * p))] * 1e3 if g else float("nan")  # noqa: E731
    lg = res["lags"]
    lag = lambda p: lg[min(len(lg) - 1, int(len(lg) * p))] * 1e3 if lg else float("nan")  # noqa: E731
    faults = sum(v for k, v in res["outcomes"].items() if "server fault" in k)
    lines = [f"# Soak: {args.streams} streams for {wall / 60:.1f} minutes on {args.model or 'berry-chat'}", "",
             f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, shared)", "",
             f"**Server faults: {faults}.** Inter-token latency of completed streams: p50 {q(.5):.1f} ms, "
             f"p99 {q(.99):.1f} ms, max {g[-1] * 1e3 if g else float('nan'):.1f} ms ({len(g)} gaps). These gaps are "
             f"seen by one Python client process reading every stream; its own event loop woke late by p50 "
             f"{lag(.5):.1f} ms, p99 {lag(.99):.1f} ms (a 10 ms sleep timed alongside), which is part of them.", "",
             f"At the end (idle): running {res['end'].get('berry_running')}, waiting "
             f"{res['end'].get('berry_queue_depth')}, KV cache in use {res['end'].get('berry_kv_cache_usage')}; "
             f"/health {json.dumps(res['health'])}", "", "| outcome | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(res["outcomes"].items())]
    roles = sorted({k.split(" ")[0] for _, d in res["rss"] for k in d})
    lines += ["", "RSS (MB) over time, summed per role:", "", "| t (s) | " + " | ".join(roles) + " |",
              "|---:|" + "---:|" * len(roles)]
    for t, d in res["rss"]:
        per = {r: sum(v for k, v in d.items() if k.startswith(r + " ")) for r in roles}
        lines.append(f"| {t:.0f} | " + " | ".join(f"{per[r]:.0f}" for r in roles) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="what `berry serve` serves (default: berry-chat)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra `berry serve` arguments")
    ap.add_argument("--out", default=None, help="write the report (markdown) here")
    args = ap.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "berrylm", "serve", *([args.model] if args.model else []), "--port", str(port),
           *args.serve_args.split()]
    base = f"http://127.0.0.1:{port}"
    proc = start(cmd, base)  # waits until it answers; a server that exits or never comes up raises with its log
    try:
        t = time.monotonic()
        res = asyncio.run(soak(base, proc.pid, args.streams, args.minutes * 60, args.seed))
        text = report(res, args, "python -m berrylm.bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
                      time.monotonic() - t)
    finally:
        stop(proc)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
