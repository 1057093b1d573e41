"""A sequence (one choice of one request) as the engine tracks it, and the `Delta` it reports each step.

A sequence's tokens are prompt + output; `num_computed` of them have K/V in the cache. Its status moves

    WAITING --admit--> RUNNING --finish--> FINISHED          (the scheduler sets it; `Scheduler.finish` is the
       ^                  |                                   one way out, for "stop", "length", "abort", "error")
       +----preempt-------+
    RUNNING/WAITING --built-in tool call--> PAUSED --result back--> RUNNING/WAITING

A PAUSED sequence keeps its place (blocks and slot when it was running) and is never scheduled.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from berrylm.serve.params import SampleOut, SamplingParams
from berrylm.serve.tools.builtin import ToolEvent

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the scheduler's queue: not admitted yet, or preempted
    RUNNING = "running"  # admitted: holds KV blocks and a state slot
    PAUSED = "paused"  # waiting for a built-in tool's result
    FINISHED = "finished"  # `finish_reason` says why


@dataclass(eq=False)  # identity: `seq in running` must not compare every field
class Sequence:
    request_id: str
    index: int  # choice index within the request (n > 1)
    prompt: list[int]
    params: SamplingParams
    sink: object = None  # callable(Delta) the engine reports to
    leader: Sequence | None = None  # n > 1: siblings wait until the leader's prompt is cached
    tools: object = None  # serve.tools.builtin.ToolOptions or None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    output: list[int] = field(default_factory=list)  # generated tokens + appended tool responses
    n_injected: int = 0  # tool-response tokens appended to `output` (input to the model, not generated)
    # KV placement: the scheduler and the block manager (which alone computes the prefix-cache hashes)
    table: list[int] = field(default_factory=list)
    num_computed: int = 0
    slot: int = -1
    n_hashed: int = 0  # full blocks already published to the prefix cache
    last_hash: int | None = None  # chain hash of block n_hashed - 1
    cached_tokens: int = 0
    num_preemptions: int = 0
    # output processing (serve/postprocess.py)
    detok: object = None
    guide: object = None
    tool_rounds: int = 0
    call_start: int = -1  # index in `output` just after the open `<tool_call>`, -1 when no call is open
    arrival: float = field(default_factory=time.monotonic)
    last_emit: float | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))

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

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def paused(self) -> bool:
        return self.status is SequenceStatus.PAUSED


@dataclass
class Delta:
    """What one sequence produced in one step."""
    request_id: str
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[SampleOut] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the model generated
    cached_tokens: int = 0
    tool_events: list[ToolEvent] = field(default_factory=list)  # built-in calls finished (result back)
    prompt_logprobs: list[SampleOut | None] | None = None  # per prompt token (None for the first); once, first


def delta_for(s: Sequence, **fields) -> Delta:
    """A Delta of s with its current token counts (prompt counts the appended tool responses)."""
    return Delta(s.request_id, s.index, prompt_tokens=len(s.prompt) + s.n_injected,
                 completion_tokens=s.n_generated, cached_tokens=s.cached_tokens, **fields)
