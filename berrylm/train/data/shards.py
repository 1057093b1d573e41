"""Token shards: a corpus's docs.{train,val}.jsonl tokenized into flat train.bin / val.bin + meta.json.

Each .bin is a raw numpy array of token ids (uint16, or uint32 when the vocabulary exceeds 65535), every
document followed by <|endoftext|>. meta.json records the dtype, the tokenizer used and, per split and
per source, how many documents, tokens and UTF-8 bytes went in (bytes make bits-per-byte possible).
`load_shard` memory-maps a .bin with the dtype from the meta.json next to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from berrylm.model.tokenizer import Tokenizer

BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65535 as the format specifies), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _batches(path: Path) -> Iterator[list[dict]]:
    batch = []
    for doc in read_jsonl(path):
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_corpus(corpus: str | Path, tokenizer_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write train.bin / val.bin / meta.json for corpus/docs.{train,val}.jsonl; returns the meta dict."""
    corpus = Path(corpus)
    out = Path(out) if out else corpus
    tok_dir = Path(tokenizer_dir).resolve()
    if not (tok_dir / "tokenizer.json").exists():
        raise ValueError(f"no tokenizer.json in {tok_dir}")
    tok = Tokenizer.load(tok_dir)
    dtype = token_dtype(tok.vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer": str(tok_dir)}
    sources: dict[str, dict] = {}
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        src = corpus / f"docs.{split}.jsonl"
        if not src.exists():
            raise ValueError(f"{src} not found (run `berry data build` first)")
        n_tokens = n_bytes = 0
        tmp = out / f"{split}.bin.tmp"
        with open(tmp, "wb") as f:
            for batch in _batches(src):
                texts = [d["text"] for d in batch]
                for doc, ids in zip(batch, tok.encode_batch(texts)):
                    arr = np.array(ids + [tok.endoftext_id], dtype=dtype)  # [len(doc)+1]
                    f.write(arr.tobytes())
                    b = len(doc["text"].encode("utf-8"))
                    s = sources.setdefault(doc.get("source", "unknown"), {"docs": 0, "tokens": 0, "bytes": 0})
                    s["docs"] += 1
                    s["tokens"] += len(arr)
                    s["bytes"] += b
                    n_tokens += len(arr)
                    n_bytes += b
        tmp.replace(out / f"{split}.bin")
        meta[f"{split}_tokens"] = n_tokens
        meta[f"{split}_bytes"] = n_bytes
    meta["sources"] = dict(sorted(sources.items()))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(directory: str | Path) -> dict:
    """The meta.json of a shards directory."""
    path = Path(directory) / "meta.json"
    if not path.exists():
        raise ValueError(f"{path} not found (run `berry data tokenize` first)")
    return json.loads(path.read_text())


def load_shard(path: str | Path, dtype: str | None = None) -> np.memmap:
    """Memory-map a train.bin / val.bin as a 1-D array [num_tokens]; dtype defaults to the one in meta.json."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} not found (run `berry data tokenize` first)")
    dtype = dtype or load_meta(path.parent)["dtype"]
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")
