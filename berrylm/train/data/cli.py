"""`berry data fetch|build|tokenize|chat`: from packaged or user text to token shards, and chat data."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build a pretraining corpus or chat data (shards, dedup, generators)")
    dsub = p.add_subparsers(dest="data_command", metavar="STEP", required=True)

    f = dsub.add_parser("fetch", help="download the offline text packages into a cache")
    f.add_argument("--sources", default="all", help="comma list (default all): see train/data/sources.py")
    f.add_argument("--cache", default="data/raw")
    f.set_defaults(func=run_fetch)

    b = dsub.add_parser("build", help="clean, dedup and split documents into docs.{train,val}.jsonl")
    b.add_argument("--sources", default="", help="comma list of packaged sources ('all' for every one)")
    b.add_argument("--input", nargs="*", default=[], help="your .txt/.jsonl/.parquet files or folders")
    b.add_argument("--cache", default="data/raw")
    b.add_argument("--out", default="data/corpus")
    b.add_argument("--val-fraction", type=float, default=0.01)
    b.add_argument("--near-dup-threshold", type=float, default=0.8)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_build)

    t = dsub.add_parser("tokenize", help="tokenize a corpus dir into train.bin / val.bin shards")
    t.add_argument("corpus")
    t.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json")
    t.add_argument("--out", default=None, help="default: the corpus dir")
    t.set_defaults(func=run_tokenize)

    c = dsub.add_parser("chat", help="generate chat/SFT data in the OpenAI messages JSONL format")
    c.add_argument("--kind", default="calculator", help="comma list: calculator, dictionary, dialogue, persona, text")
    c.add_argument("--n", type=int, default=1000, help="conversations per kind")
    c.add_argument("--out", required=True)
    c.add_argument("--heldout", action="store_true", help="held-out arithmetic eval set (unseen phrasings)")
    c.add_argument("--cache", default="data/raw", help="fetched sources (dictionary, dialogue)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--corpus", default="data/corpus", help="built corpus that --kind text draws documents from")
    c.add_argument("--weights", default="", help="calculator mix, e.g. fchain=48,word=16 (others keep their default)")
    c.set_defaults(func=run_chat)


def _sources(arg: str) -> list[str]:
    from berrylm.train.data.sources import SOURCES

    if arg in ("", "none"):
        return []
    return SOURCES if arg == "all" else [s.strip() for s in arg.split(",") if s.strip()]


def run_fetch(args: argparse.Namespace) -> int:
    from berrylm.train.data.sources import fetch

    fetch(_sources(args.sources), args.cache)
    print(f"fetched into {args.cache}")
    return 0


def read_inputs(paths: list[str]):
    """Documents from the user's files: .txt (one document per file), .jsonl ("text"), .parquet ("text")."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".parquet"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    for f in files:
        name = f"input:{f.stem}"
        if f.suffix == ".txt":
            yield {"text": f.read_text(encoding="utf-8", errors="replace"), "source": name}
        elif f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        yield {"text": json.loads(line)["text"], "source": name}
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{f}:{i + 1}: expected a JSON object with a \"text\" field") from None
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise RuntimeError(f"{f}: reading parquet needs pyarrow: pip install 'berrylm[train]'") from None

            table = pq.read_table(f)
            if "text" not in table.column_names:
                raise ValueError(f"{f}: no 'text' column (has: {', '.join(table.column_names)})")
            for t in table.column("text").to_pylist():
                if t:
                    yield {"text": t, "source": name}
        else:
            raise ValueError(f"{f}: unsupported file type (use .txt, .jsonl or .parquet)")


def build_corpus(docs: list[dict], out: str | Path, val_fraction: float = 0.01, threshold: float = 0.8,
                 seed: int = 0) -> dict:
    """Clean, split, dedup and shuffle {"text", "source"} docs; write out/docs.{train,val}.jsonl.
    Returns per-source stats {source: {"raw", "docs", "bytes", "exact_dups", "near_dups"}}."""
    from berrylm.train.data.clean import clean_text, keep, split_long
    from berrylm.train.data.dedup import dedup

    stats: dict[str, dict] = {}
    cleaned = []
    for d in docs:
        st = stats.setdefault(d["source"], {"raw": 0, "docs": 0, "bytes": 0, "exact_dups": 0, "near_dups": 0})
        st["raw"] += 1
        for piece in split_long(clean_text(d["text"])):
            if keep(piece):
                cleaned.append({"text": piece, "source": d["source"]})
    kept, _, why = dedup([d["text"] for d in cleaned], threshold=threshold, explain=True)
    for i, reason in why.items():
        stats[cleaned[i]["source"]][f"{reason}_dups"] += 1
    cleaned = [cleaned[i] for i in kept]
    random.Random(seed).shuffle(cleaned)
    n_val = min(len(cleaned) - 1, max(1, round(len(cleaned) * val_fraction))) if val_fraction > 0 else 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("val", cleaned[:max(0, n_val)]), ("train", cleaned[max(0, n_val):])):
        tmp = out / f"docs.{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        tmp.replace(out / f"docs.{split}.jsonl")
    for d in cleaned:
        stats[d["source"]]["docs"] += 1
        stats[d["source"]]["bytes"] += len(d["text"].encode("utf-8"))
    return {"sources": stats, "train_docs": len(cleaned) - max(0, n_val), "val_docs": max(0, n_val)}


def run_build(args: argparse.Namespace) -> int:
    from berrylm.train.data.sources import fetch, iter_documents

    t0 = time.time()
    sources = _sources(args.sources)
    if not sources and not args.input:
        raise ValueError("nothing to build: give --sources and/or --input")
    if not 0 <= args.val_fraction < 1:
        raise ValueError("--val-fraction must be in [0, 1)")
    fetch(sources, args.cache)
    docs = [d for s in sources for d in iter_documents(s, args.cache)] + list(read_inputs(args.input))
    res = build_corpus(docs, args.out, args.val_fraction, args.near_dup_threshold, args.seed)
    print(f"{'source':<24}{'raw docs':>10}{'kept docs':>11}{'MB':>8}{'exact dups':>12}{'near dups':>11}")
    tot = Counter()
    for name, st in sorted(res["sources"].items()):
        tot.update(st)
        print(f"{name:<24}{st['raw']:>10}{st['docs']:>11}{st['bytes'] / 1e6:>8.2f}{st['exact_dups']:>12}"
              f"{st['near_dups']:>11}")
    print(f"{'total':<24}{tot['raw']:>10}{tot['docs']:>11}{tot['bytes'] / 1e6:>8.2f}{tot['exact_dups']:>12}"
          f"{tot['near_dups']:>11}")
    print(f"dedup removed {tot['exact_dups'] + tot['near_dups']} docs; {res['train_docs']} train / "
          f"{res['val_docs']} val docs -> {args.out} ({time.time() - t0:.0f}s)")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from berrylm.train.data.shards import tokenize_corpus

    meta = tokenize_corpus(args.corpus, args.tokenizer, args.out)
    print(f"{'source':<24}{'docs':>8}{'tokens':>12}{'bytes/token':>13}")
    for s, v in sorted(meta["sources"].items()):
        print(f"{s:<24}{v['docs']:>8}{v['tokens']:>12}{v['bytes'] / max(1, v['tokens']):>13.2f}")
    print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']}) "
          f"-> {args.out or args.corpus}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from berrylm.train.data.chat_data import write_chat_data

    counts = write_chat_data([k.strip() for k in args.kind.split(",") if k.strip()], args.n, args.out,
                             heldout=args.heldout, cache=args.cache, seed=args.seed,
                             weights=args.weights, corpus=args.corpus)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" conversations -> {args.out}")
    return 0
