"""Exact and near-duplicate removal: a hash of the normalised text, then MinHash with LSH banding.

MinHash: a document is the set of its word 5-gram shingles; each of `num_perm` hash functions
(multiply-shift over a 32-bit shingle hash) keeps its minimum over the set, and the fraction of equal
minima estimates the Jaccard similarity. LSH splits the signature into `bands` of `rows`; two documents
whose signatures agree on a whole band are candidates, and a candidate is a duplicate when its estimated
Jaccard is at least `threshold`. The first document of a duplicate group is kept.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import defaultdict

import numpy as np


def exact_key(text: str) -> str:
    """Hash of the lower-cased, whitespace-collapsed text: equal keys are exact duplicates."""
    return hashlib.blake2b(re.sub(r"\s+", " ", text.lower()).strip().encode(), digest_size=16).hexdigest()


def shingles(text: str, n: int = 5) -> np.ndarray:
    """32-bit hashes (crc32) of the text's word n-grams, as uint64 [num_shingles]."""
    words = re.findall(r"\w+", text.lower())
    grams = {" ".join(words[i: i + n]) for i in range(max(1, len(words) - n + 1))}
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


class MinHasher:
    """num_perm multiply-shift hash functions h -> ((a*h + b) mod 2^64) >> 32 (a odd), min over the shingles."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:  # [num_perm] uint64
        h = shingles(text)  # [S]
        with np.errstate(over="ignore"):
            v = (h[:, None] * self.a[None] + self.b[None]) >> np.uint64(32)  # [S, num_perm], wraps mod 2^64
        return v.min(axis=0)


def dedup(texts: list[str], threshold: float = 0.8, num_perm: int = 128, bands: int = 16,
          explain: bool = False):
    """Indices of the documents to keep (first of each duplicate group) and counts {"exact", "near"} of the
    dropped ones; with explain=True also {dropped index: "exact" | "near"}."""
    rows = num_perm // bands
    why: dict[int, str] = {}
    seen: set[str] = set()
    after_exact = []
    for i, t in enumerate(texts):
        k = exact_key(t)
        if k in seen:
            why[i] = "exact"
            continue
        seen.add(k)
        after_exact.append(i)
    hasher = MinHasher(num_perm)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    sigs: dict[int, np.ndarray] = {}
    kept = []
    for i in after_exact:
        sig = hasher.signature(texts[i])  # [num_perm]
        keys = [(b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(bands)]
        cands = {j for k in keys for j in buckets.get(k, ())}
        if any((sigs[j] == sig).mean() >= threshold for j in cands):
            why[i] = "near"
            continue
        sigs[i] = sig
        for k in keys:
            buckets[k].append(i)
        kept.append(i)
    counts = {"exact": len(texts) - len(after_exact), "near": len(after_exact) - len(kept)}
    return (kept, counts, why) if explain else (kept, counts)
