"""Compile the Triton kernels a server will launch before its first request arrives.

A kernel's first launch for a new specialisation (dtype, head size, vocabulary block, gate/state flags, whether
value columns are split) compiles it, which takes seconds; without this the first user of a fresh server waits
for that. `warmup` launches each kernel once per specialisation the engine will use, on small inputs.
"""

from __future__ import annotations

import math
import time

import torch

from berrylm.kernels.dispatch import use_triton
from berrylm.kernels.linear_attention import linear_attention, linear_attention_step_
from berrylm.kernels.sampling import sample


def warmup(device: torch.device, dtype: torch.dtype, vocab_size: int, head_dim: int = 0, n_linear_heads: int = 0,
           gated: bool = False, max_batch: int = 1) -> float:
    """Launch the sampler (1 and max_batch rows) and, for hybrids, the linear-attention prefill (both column
    splits) and decode step once each. Returns the seconds spent; 0.0 where the kernels do not run (CPU)."""
    if not use_triton(torch.empty(0, device=device)):
        return 0.0
    t0 = time.perf_counter()
    for B in sorted({1, max_batch}):
        logits = torch.randn(B, vocab_size, device=device)
        f = lambda x, dt=torch.float32, n=B: torch.full((n,), x, device=device, dtype=dt)  # noqa: E731
        sample(logits, f(0.8), f(40, torch.int64), f(0.9), f(0.05), f(1, torch.int64), f(0, torch.int64))
    H, D = n_linear_heads, head_dim
    if H:
        for B in (1, math.ceil(128 / H)):  # below / above the (sequence, head) count that splits value columns
            q, k, v = (torch.randn(B, 70, H, D, device=device, dtype=dtype) for _ in range(3))
            gate = torch.randn(B, 70, H, device=device, dtype=dtype) if gated else None
            state = (torch.zeros(B, H, D, D, device=device), torch.zeros(B, H, D, device=device))
            linear_attention(q, k, v, gate, state)
            S, z = state
            slots = torch.arange(B, device=device)
            linear_attention_step_(q[:, 0], k[:, 0], v[:, 0], gate[:, 0] if gated else None, S, z, slots)
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0
