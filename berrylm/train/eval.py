"""`berry eval MODEL`: val bits-per-byte on token shards or a text file, and calculator tool-use accuracy.

With `--quantize int8` every metric is computed for the float model and for the quantized inference path
(model/quantize.py) side by side, with their greedy (teacher-forced argmax) agreement; the quality guard fails the
command when the quantized bpb is more than 1% above the float one or its tool accuracy is more than 0.5 points
below.

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

from berrylm.model.checkpoint import load_checkpoint


def contains_number(text: str, expected: str) -> bool:
    return re.search(r"(?<![\d.])" + re.escape(expected) + r"(?!\d|\.\d)", text) is not None


def run_calculator(name: str, arguments_json: str) -> str:
    from berrylm.model.calculator import CalcError, calculate

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
    from berrylm.train.generate import chat_with_tools

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
    from berrylm.train.pretrain import ShardBatches

    data = ShardBatches(shards, seq_len, 8)
    total, n, argmax = 0.0, 0, []
    for x, y in data.val_batches(max_tokens):
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        argmax.append(logits.argmax(-1).flatten())
        n += y.numel()
    loss = total / max(1, n)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token(), "tokens": n,
            "argmax": torch.cat(argmax) if argmax else torch.zeros(0, dtype=torch.long)}


@torch.inference_mode()
def text_bpb(model, tok, text: str, seq_len: int = 512, max_tokens: int = 16384) -> dict:
    """Perplexity and bits-per-byte of a text, in windows of seq_len tokens (bytes: the UTF-8 of the text the
    evaluated tokens decode to)."""
    ids = tok.encode(text)[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the text is too short to evaluate")
    total, n, argmax = 0.0, 0, []
    for i in range(0, len(ids) - 1, seq_len):
        chunk = torch.tensor([ids[i:i + seq_len + 1]])
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        argmax.append(logits[0].argmax(-1))
        n += chunk.shape[1] - 1
    n_bytes = len(tok.decode(ids[1:n + 1]).encode())
    loss = total / n
    return {"val_loss": loss, "ppl": math.exp(loss), "val_bpb": total / math.log(2) / n_bytes, "tokens": n,
            "argmax": torch.cat(argmax)}


def load_eval_model(name: str, load_foreign=None):
    """(model, tokenizer) for a checkpoint dir / embedded name, or anyone's GGUF file / HF llama dir through
    load_foreign(path) (export's readers, which `berry eval` (berrylm/cli.py) passes in: train never imports export)."""
    path = Path(name)
    if path.exists() and (path.is_file() or _not_berry(path)):
        if load_foreign is None:
            raise ValueError(f"{name}: not a berrylm checkpoint (a GGUF file or HF directory is read by the "
                             "load_foreign reader `berry eval` passes in)")
        return load_foreign(path)
    return load_checkpoint(name)


def _not_berry(path: Path) -> bool:
    try:
        return "berrylm_format" not in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return True


BPB_GUARD = 0.01  # quantized bpb at most 1% above float
TOOL_GUARD = 0.005  # quantized tool accuracy at most 0.5 points below float


def run_eval(args: argparse.Namespace) -> int:
    text = getattr(args, "text", None)
    quant = getattr(args, "quantize", "none")
    choices = getattr(args, "choices", None)
    if not args.bpb and not args.tool_accuracy and not text and not choices:
        raise ValueError("nothing to evaluate: give --bpb SHARDS, --text FILE, --tool-accuracy HELDOUT.jsonl and/or "
                         "--choices FILE.jsonl")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model, tok = load_eval_model(args.model, getattr(args, "load_foreign", None))
    models = {"float32": model.eval().float()}
    if quant != "none":
        from berrylm.model.quantize import CALIBRATION, quantize

        q, _ = load_eval_model(args.model, getattr(args, "load_foreign", None))
        models[quant] = quantize(q.eval().float().fuse_for_inference(), quant, tok.encode(CALIBRATION))
    ok = True
    for what in ("bpb", "text"):
        source = args.bpb if what == "bpb" else text
        if not source:
            continue
        if what == "text" and not Path(text).is_file():
            raise FileNotFoundError(f"{text}: not found")
        rs = {k: (val_bpb(m, source) if what == "bpb" else
                  text_bpb(m, tok, Path(text).read_text(encoding="utf-8"), max_tokens=args.max_tokens))
              for k, m in models.items()}
        for k, r in rs.items():
            ppl = f", ppl {r['ppl']:.3f}" if "ppl" in r else ""
            label = "val" if what == "bpb" else Path(text).name
            print(f"[{k}] {label} loss {r['val_loss']:.4f} nats/token{ppl}, {label} bpb {r['val_bpb']:.4f} "
                  f"({r['tokens']:,} tokens)")
        if quant != "none":
            f, qr = rs["float32"], rs[quant]
            rel = qr["val_bpb"] / f["val_bpb"] - 1
            agree = float((f["argmax"] == qr["argmax"]).float().mean())
            good = rel <= BPB_GUARD
            ok &= good
            print(f"quality guard: {quant} bpb {rel:+.2%} vs float32 (limit +{BPB_GUARD:.0%}): "
                  f"{'ok' if good else 'FAILED'}; greedy agreement {agree:.1%}")
    if choices:
        from berrylm.train.choice_eval import choice_accuracy, read_records

        recs = read_records(choices)[: args.limit or None]
        for k, m in models.items():
            r = choice_accuracy(m, tok, recs)
            print(f"[{k}] {Path(choices).name}: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} ({r['n']} records)")
    if args.tool_accuracy:
        path = Path(args.tool_accuracy)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found")
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if args.limit:
            records = records[: args.limit]
        accs = {}
        for k, m in models.items():
            t0 = time.time()
            r = tool_accuracy(m, tok, records)
            accs[k] = r["accuracy"]
            print(f"[{k}] {'kind':<28}{'accuracy':>10}")
            for kind, v in r["by_kind"].items():
                print(f"[{k}] {kind:<28}{v:>10.1%}")
            print(f"[{k}] {'ALL':<28}{r['accuracy']:>10.1%}   ({r['n']} questions, calculator called in "
                  f"{r['called_tool']:.0%}, {time.time() - t0:.0f}s)")
            for q, exp, raw in r["failures"]:
                print(f"  miss: {q!r} expected {exp}: {raw!r}")
        if quant != "none":
            drop = accs["float32"] - accs[quant]
            good = drop <= TOOL_GUARD + 1e-9
            ok &= good
            print(f"quality guard: {quant} tool accuracy {accs[quant]:.1%} vs {accs['float32']:.1%} float32 "
                  f"({-drop * 100:+.1f} points, limit -{TOOL_GUARD * 100:.1f}): {'ok' if good else 'FAILED'}")
    return 0 if ok else 1
