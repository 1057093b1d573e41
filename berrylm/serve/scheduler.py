"""The scheduler: who runs in the next step, with which KV blocks and state slot. It alone edits its queues.

A step computes
    decode  : every running sequence with exactly one token left (the one sampled last step), in ONE batch
    prefill : up to `prefill_chunk` tokens of sequences with more left (new or preempted ones), chunked
New sequences are admitted between steps (continuous batching) while there is a batch row, a state slot
and KV blocks for their whole current length. When a running sequence needs a new block and none is free,
the most recently admitted sequence is preempted: its blocks and slot are freed and it goes back to the
front of the queue, to be recomputed later from its tokens (its output so far is kept, nothing is lost).
`finish(seq, reason)` is the one way out of the queues, whatever the reason (stop, length, abort, error).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from berrylm.serve.block_manager import BlockManager
from berrylm.serve.sequence import Sequence, SequenceStatus


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

    # --- the queues' way in and out ---
    def add(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.status = SequenceStatus.WAITING
        self.waiting.extend(seqs)

    def finish(self, seq: Sequence, reason: str) -> None:
        """seq is done (stop, length, abort, error): free its blocks and slot, leave both queues."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self._free(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def finish_all(self, reason: str) -> list[Sequence]:
        """Finish every queued sequence (the engine failed); returns them, running ones first."""
        seqs = list(self.running) + list(self.waiting)
        for seq in seqs:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
            self._free(seq)
        self.waiting.clear()
        return seqs

    def pause(self, seq: Sequence) -> None:
        """seq waits for a built-in tool's result: it keeps its place and is not scheduled."""
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING if seq in self.running else SequenceStatus.WAITING

    def has_runnable(self) -> bool:
        """A queued sequence that is not paused on a tool."""
        return any(not s.paused for s in self.running) or any(not s.paused for s in self.waiting)

    # --- internals ---
    def _admit(self, seq: Sequence) -> bool:
        need = self.blocks.blocks_for(seq.length)
        hits = self.blocks.match_prefix(seq.tokens)
        # keep one spare block per running sequence so admissions do not immediately force preemptions
        spare = len(self.running)
        if not self.blocks.can_allocate(need - len(hits) + spare, hits):
            return False
        self.blocks.allocate(seq, need, hits)
        seq.cached_tokens = seq.cached_tokens or seq.num_computed
        seq.slot = self.free_slots.pop()
        self.on_reset_slot(seq.slot)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _free(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
        seq.slot = -1
        if seq in self.running:
            self.running.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.preemptions += 1
        if not seq.paused:
            seq.status = SequenceStatus.WAITING
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
                self._preempt(victim)
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
