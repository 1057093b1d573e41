"""What a request asks of the sampler: `SamplingParams` (one per choice), and what one draw gives back
(`SampleOut`). Plain dataclasses without torch, so the HTTP process (serve/api.py, serve/protocol.py) builds them
without importing torch; serve/sampler.py turns them into batched tensors in the engine process."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    json_mode: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, with this many top alternatives (echo)
    _bias: tuple | None = field(default=None, init=False, repr=False, compare=False)  # sampler.bias_tensors' cache

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random.getrandbits(63)

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def sibling_seed(seed: int, i: int) -> int:
    """Choice i's seed of a request with n > 1: seed + i, wrapped into int64 (seed may be 2**63 - 1)."""
    return (seed + i + 2**63) % 2**64 - 2**63


@dataclass
class SampleOut:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None  # top_logprobs (token, logprob), best first
