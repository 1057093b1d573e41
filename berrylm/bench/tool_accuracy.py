"""Calculator tool-use accuracy through a live server over HTTP (the official `openai` client).

    berry data chat --kind calculator --heldout ... > heldout.jsonl     # {"messages": [...], "expected": "84"}
    berry serve berry-chat &
    berry bench tool_accuracy --data heldout.jsonl [--base-url http://127.0.0.1:8000/v1] [--limit 200]

Each record's messages go to /v1/chat/completions (greedy, no client tools: the server's built-in calculator
answers the calls). A record is correct when the final content contains the expected result string exactly
(thousands separators ignored). Prints accuracy, how many answers used the calculator, and the misses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _ask(client, model: str, rec: dict, max_tokens: int) -> tuple[bool, int, str]:
    r = client.chat.completions.create(model=model, messages=rec["messages"], temperature=0, max_tokens=max_tokens)
    m = r.choices[0].message
    calls = (m.model_extra or {}).get("builtin_tool_calls") or []
    content = m.content or ""
    return str(rec["expected"]) in content.replace(",", ""), len(calls), content


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="berry bench tool_accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="JSONL from `berry data chat --kind calculator --heldout`")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="model id (default: the server's first model)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--show", type=int, default=5, help="misses to print")
    args = ap.parse_args(argv)
    import openai

    try:
        recs = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.data}: cannot read the records ({e})") from None
    recs = recs[: args.limit] if args.limit else recs
    if not recs or any("messages" not in r or "expected" not in r for r in recs):
        raise ValueError(f"{args.data}: expected JSONL records with 'messages' and 'expected'")
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=2, timeout=120)
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        raise RuntimeError(f"no server at {args.base_url} (start one with `berry serve`)") from None
    t0 = time.time()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda r: _ask(client, model, r, args.max_tokens), recs))
    correct = sum(ok for ok, _, _ in results)
    used = sum(n > 0 for _, n, _ in results)
    print(f"tool accuracy  {model}  {len(recs)} questions  {time.time() - t0:.1f} s")
    print(f"  exact answer   {correct}/{len(recs)} = {100 * correct / len(recs):.1f}%")
    print(f"  used the tool  {used}/{len(recs)}")
    misses = [(r, c) for r, (ok, _, c) in zip(recs, results) if not ok]
    for r, c in misses[: args.show]:
        q = r["messages"][-1]["content"]
        print(f"  miss: {q!r} expected {r['expected']!r}, got {c[:80]!r}", file=sys.stdout)
    return 0
