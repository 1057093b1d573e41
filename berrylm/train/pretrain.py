"""Pretraining batches: random (seq_len + 1)-token windows from the memory-mapped train.bin.

The windows of optimizer step s, micro-batch m are drawn from a generator seeded by (seed, s, m), so a
batch is a pure function of its step: resuming at step s sees exactly the data the uninterrupted run
would have seen, and under DDP each rank simply takes its share of the micro-batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from berrylm.train.data.shards import load_meta, load_shard


class ShardBatches:
    def __init__(self, shards: str | Path, seq_len: int, micro_batch: int, seed: int = 0):
        self.meta = load_meta(shards)
        self.train = load_shard(Path(shards) / "train.bin", self.meta["dtype"])
        self.val = load_shard(Path(shards) / "val.bin", self.meta["dtype"])
        if len(self.train) <= seq_len + 1:
            raise ValueError(f"{shards}: train.bin has {len(self.train)} tokens, fewer than --seq-len + 1")
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.vocab_size = self.meta["vocab_size"]

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [micro_batch, seq_len] int64; y = x shifted by one."""
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, self.micro_batch)
        rows = np.stack([self.train[s: s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def val_batches(self, max_tokens: int = 131072) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows from the start of val.bin, the same every time (for comparable val losses)."""
        n = min(len(self.val) - 1, max_tokens) // self.seq_len
        out = []
        for i in range(0, n, self.micro_batch):
            rows = [np.asarray(self.val[j * self.seq_len: (j + 1) * self.seq_len + 1], dtype=np.int64)
                    for j in range(i, min(n, i + self.micro_batch))]
            t = torch.from_numpy(np.stack(rows))
            out.append((t[:, :-1], t[:, 1:]))
        return out

    def bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / max(1, self.meta["val_tokens"])
