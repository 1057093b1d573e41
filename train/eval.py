"""`berry eval MODEL`: val bits-per-byte on token shards, and calculator tool-use accuracy.

Tool accuracy runs each held-out question (records {"messages": [...], "expected": "84", ...} from
`berry data chat --kind calculator --heldout`) through the model greedily, in-process, with the real
calculator answering its calls exactly as the server does (train/generate.py: chat_with_tools). A record
counts as correct when the final answer contains the expected result as a whole number (not as part of a
longer number).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint


def contains_number(text: str, expected: str) -> bool:
    return re.search(r"(?<![\d.])" + re.escape(expected) + r"(?!\d|\.\d)", text) is not None


def run_calculator(name: str, arguments_json: str) -> str:
    from serve.tools.calculator import CalcError, calculate

    if name != "calculator":
        return f"error: unknown tool {name}"
    try:
        return calculate(json.loads(arguments_json)["expression"])
    except CalcError as e:
        return f"error: {e}"
    except (ValueError, KeyError, TypeError):
        return "error: the calculator needs {\"expression\": \"...\"}"


@torch.inference_mode()
def tool_accuracy(model, tok, records: list[dict], verbose: bool = False) -> dict:
    from train.generate import chat_with_tools

    by_kind: dict = defaultdict(lambda: [0, 0])
    failures = []
    correct = called = 0
    for r in records:
        out = chat_with_tools(model, tok, r["messages"], run_calculator)
        ok = contains_number(out["content"], r["expected"])
        correct += ok
        called += bool(out["tool_calls"])
        k = by_kind[r.get("template", r.get("op", "all"))]
        k[0] += ok
        k[1] += 1
        if not ok and len(failures) < 8:
            failures.append((r["messages"][-1]["content"], r["expected"], out["raw"][:200]))
        if verbose:
            print(("OK  " if ok else "BAD ") + r["messages"][-1]["content"][:60], "->", out["content"][:60])
    n = max(1, len(records))
    return {"n": len(records), "accuracy": correct / n, "called_tool": called / n,
            "by_kind": {k: v[0] / v[1] for k, v in sorted(by_kind.items())}, "failures": failures}


@torch.inference_mode()
def val_bpb(model, shards: str, seq_len: int = 512, max_tokens: int = 262144) -> dict:
    from train.pretrain import ShardBatches

    data = ShardBatches(shards, seq_len, 8)
    total, n = 0.0, 0
    for x, y in data.val_batches(max_tokens):
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    loss = total / max(1, n)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token(), "tokens": n}


def run_eval(args: argparse.Namespace) -> int:
    if not args.bpb and not args.tool_accuracy:
        raise ValueError("nothing to evaluate: give --bpb SHARDS and/or --tool-accuracy HELDOUT.jsonl")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.model)
    model.eval()
    if args.bpb:
        r = val_bpb(model, args.bpb)
        print(f"val loss {r['val_loss']:.4f} nats/token, val bpb {r['val_bpb']:.4f} ({r['tokens']:,} tokens)")
    if args.tool_accuracy:
        path = Path(args.tool_accuracy)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found")
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if args.limit:
            records = records[: args.limit]
        t0 = time.time()
        r = tool_accuracy(model, tok, records)
        print(f"{'kind':<28}{'accuracy':>10}")
        for k, v in r["by_kind"].items():
            print(f"{k:<28}{v:>10.1%}")
        print(f"{'ALL':<28}{r['accuracy']:>10.1%}   ({r['n']} questions, calculator called in "
              f"{r['called_tool']:.0%}, {time.time() - t0:.0f}s)")
        for q, exp, raw in r["failures"]:
            print(f"  miss: {q!r} expected {exp}: {raw!r}")
    return 0
