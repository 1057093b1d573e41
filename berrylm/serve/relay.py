"""How Deltas travel from the engine thread to the HTTP layer's per-request asyncio queues.

DeltaRelay batches the hand-over (one event-loop wake-up per engine step, not per token), and `coalesce` lets
a stream that fell behind send the tokens it has waiting in one chunk instead of one chunk each, so a loaded
server spends its time generating rather than framing SSE events.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from berrylm.serve.sequence import Delta


class DeltaRelay:
    """Engine thread -> event loop. Deltas collect here and one callback per burst hands them to their request
    queues: one loop wake-up per engine step instead of one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, q: asyncio.Queue, d: Delta) -> None:
        with self.lock:
            self.pending.append((q, d))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for q, d in items:
            q.put_nowait(d)


def coalesce(backlog: deque[Delta]) -> Delta:
    """Pop the first Delta and fold into it the ones right behind it for the same choice, up to and including a
    finish; a built-in tool event keeps its own chunk."""
    d = backlog.popleft()
    while backlog and backlog[0].index == d.index and backlog[0].request_id == d.request_id \
            and d.finish_reason is None and not d.tool_events and not backlog[0].tool_events:
        b = backlog.popleft()
        d = Delta(b.request_id, b.index, d.text + b.text, d.tokens + b.tokens, d.logprobs + b.logprobs,
                  b.finish_reason, b.prompt_tokens, b.completion_tokens, b.cached_tokens,
                  prompt_logprobs=d.prompt_logprobs or b.prompt_logprobs)
    return d
