"""Sequences and the scheduler: who runs in the next step, with which KV blocks and state slot.

A sequence's tokens are prompt + output; `num_computed` of them have K/V in the cache. A step computes
    decode  : every running sequence with exactly one token left (the one sampled last step), in ONE batch
    prefill : up to `prefill_chunk` tokens of sequences with more left (new or preempted ones), chunked
New sequences are admitted between steps (continuous batching) while there is a batch row, a state slot
and KV blocks for their whole current length. When a running sequence needs a new block and none is free,
the most recently admitted sequence is preempted: its blocks and slot are freed and it goes back to the
front of the queue, to be recomputed later from its tokens (its output so far is kept, nothing is lost).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from berrylm.serve.kv_cache import BlockManager
from berrylm.serve.sampler import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)  # identity: `seq in running` must not compare every field
class Sequence:
    request_id: str
    index: int  # choice index within the request (n > 1)
    prompt: list[int]
    params: SamplingParams
    sink: object = None  # callable(Delta) the engine reports to
    leader: Sequence | None = None  # n > 1: siblings wait until the leader's prompt is cached
    output: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    num_computed: int = 0
    slot: int = -1
    n_hashed: int = 0  # full blocks already published to the prefix cache
    last_hash: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    detok: object = None
    guide: object = None
    cached_tokens: int = 0
    num_preemptions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    last_emit: float | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    tools: object = None  # serve.tools.builtin.ToolOptions or None
    paused: bool = False  # waiting for a built-in tool's result: not scheduled, keeps its blocks and slot
    n_injected: int = 0  # tool-response tokens appended to `output` (input to the model, not generated)
    tool_rounds: int = 0
    call_start: int = -1  # index in `output` just after the open `<tool_call>`, -1 when no call is open

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def n_generated(self) -> int:
        return len(self.output) - self.n_injected

    @property
    def remaining(self) -> int:
        return self.length - self.num_computed


@dataclass
class Plan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, number of tokens to compute this step)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, prefill_chunk: int, on_reset_slot):
        self.blocks, self.max_batch, self.prefill_chunk = blocks, max_batch, prefill_chunk
        self.bs = blocks.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.on_reset_slot = on_reset_slot
        self.preemptions = 0

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.bs)

    def _admit(self, seq: Sequence) -> bool:
        need = self._blocks_for(seq.length)
        hits = self.blocks.match_prefix(seq.tokens)
        # keep one spare block per running sequence so admissions do not immediately force preemptions
        spare = len(self.running)
        if not self.blocks.can_allocate(need - len(hits) + spare, hits):
            return False
        seq.table, seq.num_computed = self.blocks.allocate(seq.tokens, need)
        seq.cached_tokens = seq.cached_tokens or seq.num_computed
        seq.n_hashed = seq.num_computed // self.bs
        seq.last_hash = self.blocks.chain_hash_prefix(seq.tokens, seq.n_hashed) if seq.n_hashed else None
        seq.slot = self.free_slots.pop()
        self.on_reset_slot(seq.slot)
        self.running.append(seq)
        return True

    def free(self, seq: Sequence) -> None:
        if seq.table:
            self.blocks.release(seq.table)
        seq.table = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
        seq.slot = -1
        if seq in self.running:
            self.running.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        self.free(seq)
        seq.num_computed = seq.n_hashed = 0
        seq.last_hash = None
        seq.num_preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> Plan:
        # 1. admit waiting sequences (FIFO; an n > 1 sibling waits for its leader's prompt)
        skipped = []
        while self.waiting and len(self.running) < self.max_batch and self.free_slots:
            seq = self.waiting[0]
            ld = seq.leader
            if seq.paused or (ld is not None and not ld.finished and ld.num_computed < len(ld.prompt) - 1):
                skipped.append(self.waiting.popleft())
                continue
            if not self._admit(seq):
                break
            self.waiting.popleft()
        self.waiting.extendleft(reversed(skipped))
        # 2. give every running sequence blocks for its whole length (one more token when decoding, the
        #    appended tool response after a built-in call), preempting the newest if needed
        decode = []
        for seq in list(self.running):
            if seq not in self.running or seq.paused:
                continue
            while len(seq.table) * self.bs < seq.length:
                if self.blocks.num_free() > 0:
                    seq.table.append(self.blocks.append_block())
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running and seq.remaining == 1:
                decode.append(seq)
        decode = [s for s in decode if s in self.running]
        # 3. prefill chunks, oldest first, within the token budget
        prefill, budget = [], self.prefill_chunk
        for seq in self.running:
            if seq.remaining > 1 and budget > 0 and not seq.paused:
                n = min(seq.remaining, budget)
                prefill.append((seq, n))
                budget -= n
        return Plan(decode, prefill)
