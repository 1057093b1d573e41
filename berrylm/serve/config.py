"""The engine's settings and their defaults, the one place `berry serve`'s flags take theirs from, and the
admission errors and context check the HTTP layer shares with the engine. Imports nothing heavy (no torch), so
`berry --help` stays instant and the HTTP process of `berry serve` never loads torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_batch: int = 64  # most sequences decoded together
    max_model_len: int | None = None  # context limit; default: the model's max_seq_len
    block_size: int = 16
    kv_cache_mb: float | None = None  # KV pool budget (default: serve.kv_cache.plan_kv's; num_blocks wins)
    num_blocks: int | None = None
    prefill_chunk: int = 512  # prompt tokens computed per step
    max_waiting: int = 256  # waiting sequences before QueueFull (HTTP 503)
    prefix_caching: bool = True
    max_tool_rounds: int = 3  # built-in tool calls per request
    tool_timeout_s: float = 1.0


class QueueFull(RuntimeError):
    pass


class ContextLengthExceeded(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param  # the request field at fault: "messages" (the prompt) or "max_tokens"


def context_budget(n_prompt: int, max_tokens: int | None, max_model_len: int) -> int:
    """The one prompt-length check: tokens a request may generate (max_tokens, else what the context leaves)."""
    if n_prompt >= max_model_len:
        raise ContextLengthExceeded(f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                                    f"has {n_prompt} tokens", "messages")
    if max_tokens is not None and n_prompt + max_tokens > max_model_len:
        raise ContextLengthExceeded(f"this model's maximum context length is {max_model_len} tokens; the prompt "
                                    f"({n_prompt}) plus max_tokens ({max_tokens}) exceed it", "max_tokens")
    return max_tokens if max_tokens is not None else max_model_len - n_prompt
