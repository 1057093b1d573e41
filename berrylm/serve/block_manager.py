"""KV block bookkeeping and the prefix cache: which blocks each sequence holds, and every prefix-cache hash.

`BlockManager` keeps a free list, ref counts, and the prefix cache, which maps the chained hash of a FULL
block of token ids (hash of the previous block + these ids) to the block holding their K/V. A finished
sequence releases its blocks; cached ones keep their K/V and sit in an LRU until a new sequence reuses them
(a hit) or the allocator evicts them (oldest first). It is the only place hashes are computed: on admission
(`allocate`: prefix hits, then the sequence's hash chain so far) and after a forward (`publish`: the blocks
the sequence has newly filled).

Prefix reuse is for pure-softmax models only. A hybrid's linear heads would need their recurrent state
at every cached block boundary; we do not snapshot states, so hybrids always prefill from token 0.
"""

from __future__ import annotations

from collections import OrderedDict

from berrylm.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used / uncached blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, oldest first
        self.hits = self.queries = 0  # prefix-cache stats, in tokens

    # --- accounting ---
    def num_free(self) -> int:
        return len(self.free) + len(self.lru)

    def usage(self) -> float:
        return 1.0 - self.num_free() / max(self.num_blocks, 1)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: int | None, ids) -> int:
        return hash((prev, tuple(ids)))

    def chain_hash_prefix(self, tokens: list[int], n_blocks: int) -> int | None:
        h = None
        for i in range(n_blocks):
            h = self.chain_hash(h, tokens[i * self.block_size:(i + 1) * self.block_size])
        return h

    # --- allocation ---
    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = None
        self.ref[b] = 1
        return b

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks for the longest run of full blocks of `tokens`, leaving at least one token to compute
        (we need its logits). The blocks are not yet taken; see `allocate`."""
        if not self.prefix_caching:
            return []
        out, h, bs = [], None, self.block_size
        for i in range((len(tokens) - 1) // bs):
            h = self.chain_hash(h, tokens[i * bs:(i + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def can_allocate(self, n_blocks: int, reuse: list[int] = ()) -> bool:
        in_lru = sum(1 for b in reuse if b in self.lru)  # reused free blocks stop being free
        return self.num_free() - in_lru >= n_blocks

    def allocate(self, seq: Sequence, n_total_blocks: int, hits: list[int]) -> None:
        """Give seq (being admitted) a block table: the prefix hits `match_prefix` found, then fresh blocks; its
        first num_computed tokens are the cached ones. The caller checked `can_allocate`."""
        for b in hits:
            if self.ref[b] == 0:
                self.lru.pop(b)
            self.ref[b] += 1
        tokens = seq.tokens
        self.queries += len(tokens)
        self.hits += len(hits) * self.block_size
        seq.table = hits + [self._take() for _ in range(n_total_blocks - len(hits))]
        seq.num_computed = len(hits) * self.block_size
        seq.n_hashed = len(hits)
        seq.last_hash = self.chain_hash_prefix(tokens, seq.n_hashed) if seq.n_hashed else None

    def append_block(self) -> int:
        return self._take()

    def publish(self, seq: Sequence) -> None:
        """Enter the full blocks seq has computed since the last call in the prefix cache."""
        n_full = seq.num_computed // self.block_size
        if n_full <= seq.n_hashed or not self.prefix_caching:
            return
        h, bs, tokens = seq.last_hash, self.block_size, seq.tokens
        for i in range(seq.n_hashed, n_full):
            h = self.chain_hash(h, tokens[i * bs:(i + 1) * bs])
            b = seq.table[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.block_hash[b] = h
                self.cached[h] = b
        seq.n_hashed, seq.last_hash = n_full, h

    def release(self, seq: Sequence) -> None:
        """Free seq's blocks (cached ones stay reusable); it holds none afterwards."""
        for b in reversed(seq.table):  # tail blocks first so they are evicted before the shared prefix
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.block_hash[b] is not None:
                    self.lru[b] = None
                else:
                    self.free.append(b)
        seq.table = []
        seq.n_hashed, seq.last_hash = 0, None
