"""The one offline decode loop: one sequence over a contiguous KVCache, for training samples in reports, evals
(train/generate.py's chat turn with tools) and export verification (export/verify.py). The serving engine runs its
own batched loop over the paged cache, but both choose tokens with kernels/sampling.py (the one definition of the
math): greedy at temperature 0, else a Gumbel-max draw whose noise is a function of (seed, step), step being
the number of tokens generated so far. So a seeded sample here is the token sequence the server returns for the
same prompt, seed and temperature (tests/test_engine.py checks it).
"""

from __future__ import annotations

import torch

from berrylm.kernels.sampling import sample
from berrylm.model.cache import KVCache
from berrylm.model.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, ids: list[int], max_new: int, stop_ids: set[int] = frozenset(),
             cache: KVCache | None = None, temperature: float = 0.0, seed: int = 0,
             max_len: int | None = None) -> tuple[list[int], KVCache]:
    """Continue `ids` (the part not yet in `cache`) by up to max_new tokens; stops after a token in stop_ids or
    when the cache is full. A new cache holds max_len tokens (default: the model's context)."""
    p = next(model.parameters())
    if cache is None:
        cache = KVCache(model.cfg, 1, max_len or model.cfg.max_seq_len, device=p.device, dtype=p.dtype)
    t = torch.tensor([float(temperature)], device=p.device)
    top_k = torch.zeros(1, dtype=torch.int64, device=p.device)
    top_p, min_p = torch.ones(1, device=p.device), torch.zeros(1, device=p.device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=p.device)
    out: list[int] = []
    x = torch.tensor([ids], device=p.device)
    for _ in range(max_new):
        if cache.length + x.shape[1] > cache.max_len:
            break
        logits = model(x, cache=cache)[:, -1]  # [1, V]
        step = torch.tensor([len(out)], dtype=torch.int64, device=p.device)
        nxt = int(sample(logits, t, top_k, top_p, min_p, seed_t, step)[0][0])
        out.append(nxt)
        if nxt in stop_ids:
            break
        x = torch.tensor([[nxt]], device=p.device)
    return out, cache
