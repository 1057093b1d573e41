"""Serving benchmark: our server vs a llama.cpp peer on the same model, same streamed chat workload.

    python -m berrylm.bench.serve --gguf MODEL.gguf [--model CKPT] [--concurrency 1,4,16,64] [--max-tokens 64] [--out F]

Starts `berry serve` on --model (default: the GGUF itself, so any llama GGUF works alone) and, when --gguf is
given, a peer on the GGUF: `$LLAMA_SERVER` (llama.cpp's llama-server; `-t` all cores, `-np` the highest
concurrency, `-c` ctx x that, continuous batching, its default f16 KV cache) if set, else `python -m
llama_cpp.server` (llama-cpp-python[server]). One server at a time. For each concurrency level it sends
`--requests` streamed chat completions (default 2 x concurrency, at least 8) with `concurrency` in flight and
prints output tok/s, TTFT p50/p99 and inter-token latency p50 for each side, the ratio ours/peer, and each server's
peak RSS (its processes' VmHWM summed). --out writes the table and the exact command to a markdown file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the `berrylm` package
PROMPTS = ["Tell me a story about a fox.", "What is the capital of France?", "Explain rain to a child.",
           "Write a short poem about the sea.", "How do plants grow?", "List three colours.",
           "Why is the sky blue?", "Say hello politely."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str, timeout: float = 120.0) -> subprocess.Popen:
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server would block once an unread pipe fills
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[0]} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not come up in {timeout:.0f}s")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process and its children (sum of VmHWM), in MB; 0 where /proc is unavailable."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            for c in msg.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(stamps)
    itl = [(b - a) for a, b in zip(stamps, stamps[1:])]
    return {"ttft": (stamps[0] - t0) if stamps else float("nan"), "tokens": n, "itl": itl}


async def run_level(base: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def guarded(i: int):
            async with sem:
                try:
                    return await one_request(client, base, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                except httpx.HTTPError:
                    return None

        await one_request(client, base, model, PROMPTS[0], 4)  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(guarded(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    failed = sum(r is None for r in res)
    res = [r for r in res if r is not None]
    ttft = sorted(r["ttft"] for r in res)
    itl = sorted(x for r in res for x in r["itl"])
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    return {"tok_s": sum(r["tokens"] for r in res) / wall, "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99),
            "itl50": pct(itl, 0.5), "failed": failed}


def peer_command(gguf: str, port: int, ctx: int, parallel: int) -> list[str]:
    exe = os.environ.get("LLAMA_SERVER")
    if exe:
        return [exe, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx * parallel),
                "-np", str(parallel), "-t", str(os.cpu_count() or 1), "--cont-batching", "--log-disable"]
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(ctx), "--n_threads", str(os.cpu_count() or 1),
            "--interrupt_requests", "False"]  # it serves one request at a time; queue the rest, do not cut them


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="our model: checkpoint dir or embedded name (default: --gguf)")
    ap.add_argument("--gguf", default=None, help="the model as GGUF, for the llama.cpp peer (and for us without "
                                                  "--model)")
    ap.add_argument("--out", default=None, help="also write the table and the command to this markdown file")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x conc))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512, help="context per sequence")
    ap.add_argument("--berry-args", default="", help="extra arguments for berry serve")
    args = ap.parse_args(argv)
    if not args.model and not args.gguf:
        ap.error("give --gguf FILE (both sides serve it) and/or --model CKPT")
    model = args.model or args.gguf
    levels = [int(x) for x in args.concurrency.split(",")]
    sides = {}
    port = free_port()
    ours = [sys.executable, "-m", "berrylm", "serve", model, "--port", str(port), "--served-model-name",
            "bench", "--max-batch", str(max(levels)), "--max-model-len", str(args.ctx), *args.berry_args.split()]
    sides["berry"] = (f"http://127.0.0.1:{port}", ours)
    if args.gguf:
        port = free_port()
        sides["llama.cpp"] = (f"http://127.0.0.1:{port}", peer_command(args.gguf, port, args.ctx, max(levels)))
    results: dict[str, dict[int, dict]] = {}
    rss: dict[str, float] = {}
    for name, (base, cmd) in sides.items():  # one server at a time: they would compete for the cores
        proc = start(cmd, base, timeout=300)
        try:
            results[name] = {}
            for c in levels:
                n = args.requests or max(8, 2 * c)
                results[name][c] = asyncio.run(run_level(base, "bench", c, n, args.max_tokens))
                r = results[name][c]
                print(f"{name:>10} conc {c:>3}: {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50'] * 1e3:7.1f} ms "
                      f"p99 {r['ttft99'] * 1e3:7.1f} ms  ITL p50 {r['itl50'] * 1e3:6.2f} ms  failed {r['failed']}",
                      file=sys.stderr)
            rss[name] = peak_rss_mb(proc.pid)
        finally:
            stop(proc)
    lines = [f"{'conc':>4} | {'side':>10} | {'tok/s':>8} | {'TTFT p50':>9} | {'TTFT p99':>9} | {'ITL p50':>8} | ratio"]
    for c in levels:
        for name in results:
            r = results[name][c]
            ratio = ""
            if name == "berry" and "llama.cpp" in results:
                ratio = f"{r['tok_s'] / max(results['llama.cpp'][c]['tok_s'], 1e-9):.2f}x tok/s"
            lines.append(f"{c:>4} | {name:>10} | {r['tok_s']:8.1f} | {r['ttft50'] * 1e3:7.1f}ms | "
                         f"{r['ttft99'] * 1e3:7.1f}ms | {r['itl50'] * 1e3:6.2f}ms | {ratio}"
                         + (f" ({r['failed']} failed)" if r["failed"] else ""))
    lines.append("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()))
    print("\n" + "\n".join(lines))
    if args.out:
        import datetime
        import shlex

        args_given = argv if argv is not None else sys.argv[1:]
        cmd = "python -m berrylm.bench.serve " + " ".join(shlex.quote(a) for a in args_given)
        peer = " ".join(sides["llama.cpp"][1]) if "llama.cpp" in sides else "none"
        Path(args.out).write_text(f"# bench/serve.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                                  f"\n\n`{cmd}`\n\nberry: `{' '.join(ours[1:3] + ours[3:])}`  \npeer: `{peer}`\n\n"
                                  "```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
