"""The engine's settings and their defaults, the one place `berry serve`'s flags take theirs from
(imports nothing heavy, so `berry --help` stays instant)."""

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
