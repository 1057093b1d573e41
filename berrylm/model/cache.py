"""The cache protocol the Transformer calls during prefill/decode, and a contiguous implementation.

A cache object offers four methods (the serving engine's paged cache implements the same ones):

    positions(T) -> [B, T] int64            positions of the T new tokens
    update_kv(layer, k, v) -> (k_all, v_all, mask)
        k, v [B, T, Hkv, hd] new keys/values (after RoPE); returns everything cached for that layer
        k_all, v_all [B, Hkv, L, hd] and a bool mask [B, 1, T, L] (True = may attend)
    linear_attend(layer, q, k, v, gate) -> o [B, T, Hl, hd]
        runs the linear heads from the cached recurrent state and stores the new state
    advance(T)                               called once after all layers saw the T new tokens

`KVCache` keeps every row of the batch at the same length: generation, tests and export use it.
"""

from __future__ import annotations

import torch

from berrylm.kernels.linear_attention import linear_attention, linear_attention_step_
from berrylm.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.batch, self.max_len, self.length = batch, max_len, 0
        n_kv = cfg.n_kv_cache_heads
        shape = (batch, n_kv, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        hl, hd = cfg.n_linear_heads, cfg.head_dim
        self.S = [torch.zeros(batch, hl, hd, hd, device=device) for _ in range(cfg.n_layers)]  # fp32
        self.z = [torch.zeros(batch, hl, hd, device=device) for _ in range(cfg.n_layers)]
        self.slots = torch.arange(batch, device=device)

    def positions(self, T: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + T, device=self.slots.device).expand(self.batch, T)

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k.transpose(1, 2)
        self.v[layer][:, :, self.length:end] = v.transpose(1, 2)
        q_pos = torch.arange(self.length, end, device=k.device).unsqueeze(1)  # [T, 1]
        mask = torch.arange(end, device=k.device).unsqueeze(0) <= q_pos  # [T, L]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask.expand(self.batch, 1, T, end)

    def linear_attend(self, layer: int, q, k, v, gate):
        if q.shape[1] == 1:  # decode: fused in-place update of the state slots
            g = gate[:, 0] if gate is not None else None
            return linear_attention_step_(q[:, 0], k[:, 0], v[:, 0], g, self.S[layer], self.z[layer],
                                          self.slots).unsqueeze(1)
        o, (S, z) = linear_attention(q, k, v, gate, (self.S[layer], self.z[layer]))
        self.S[layer], self.z[layer] = S, z
        return o

    def advance(self, T: int) -> None:
        self.length += T
