"""The model runner: sizes and owns the KV pool, turns a scheduler `Plan` into batches, runs the forwards and
samples the next token of every sequence that finished its prompt (or decoded) this step.

    runner = ModelRunner(backend, config)   # sizes the KV pool and the context (plan_kv), says how in kv_note
    seqs, outs = runner.run(plan)           # the sequences that sampled, and their SampleOut

Decode rows are one batched forward of one token each; prefill chunks are one padded forward for all chunks
(pure softmax models), one forward per chunk for hybrids (padding tokens would enter the linear heads'
recurrent state). `num_computed` of each sequence advances by what was computed.
"""

from __future__ import annotations

import torch

from berrylm.kernels.warmup import warmup
from berrylm.serve.backend import Backend
from berrylm.serve.kv_cache import KVPool, PagedBatch, plan_kv
from berrylm.serve.sampler import SampleOut, sample_batch
from berrylm.serve.scheduler import Plan
from berrylm.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, backend: Backend, config):
        self.backend = backend
        # the pool's size and the context it allows, and a line saying so (serve/kv_cache.py: plan_kv)
        self.num_blocks, self.max_model_len, self.kv_note = plan_kv(
            backend.cfg, config.block_size, backend.dtype, config.max_model_len, config.kv_cache_mb, config.num_blocks)
        self.pool = KVPool(backend.cfg, self.num_blocks, config.block_size, config.max_batch, backend.device,
                           backend.dtype)
        # compile the Triton kernels now (seconds on CUDA), not on the first request; a no-op on CPU
        cfg = backend.cfg
        warmup(backend.device, backend.dtype, cfg.vocab_size, cfg.head_dim, cfg.n_linear_heads, cfg.head_gate,
               config.max_batch)

    @torch.inference_mode()
    def run(self, plan: Plan) -> tuple[list[Sequence], list[SampleOut]]:
        dev = self.backend.device
        sampled, rows = [], []
        if plan.decode:
            seqs = plan.decode
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
            batch = PagedBatch(self.pool, [s.table for s in seqs], [s.num_computed for s in seqs], 1,
                               [s.slot for s in seqs])
            logits = self.backend.forward(tokens, batch)[:, -1]  # [B, V]
            for s in seqs:
                s.num_computed += 1
            sampled += seqs
            rows.append(logits)
        groups = [plan.prefill] if self.backend.cfg.n_linear_heads == 0 else [[x] for x in plan.prefill]
        for group in groups:
            if not group:
                continue
            T = max(n for _, n in group)
            toks = [s.tokens[s.num_computed:s.num_computed + n] for s, n in group]
            tokens = torch.tensor([t + [0] * (T - len(t)) for t in toks], device=dev)  # [B, T] right-padded
            batch = PagedBatch(self.pool, [s.table for s, _ in group], [s.num_computed for s, _ in group], T,
                               [s.slot for s, _ in group], [n for _, n in group])
            logits = self.backend.forward(tokens, batch)  # [B, T, V]
            for i, (s, n) in enumerate(group):
                s.num_computed += n
                if s.remaining == 0:
                    sampled.append(s)
                    rows.append(logits[i:i + 1, n - 1])
        if not sampled:
            return [], []
        return sampled, sample_batch(torch.cat(rows), sampled)
