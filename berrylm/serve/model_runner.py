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
    def run(self, plan: Plan, fail=None) -> tuple[list[Sequence], list[SampleOut]]:
        """fail(seq, error): a forward or a sample that fails for some rows alone finishes those (the engine's
        per-sequence fault isolation); the others go on. Without it, any error propagates."""
        fail = fail or _raise
        sampled, rows = [], []
        if plan.decode:
            for s, _, row in self._forward([(s, 1) for s in plan.decode], True, fail):
                s.num_computed += 1
                sampled.append(s)
                rows.append(row)
        groups = [plan.prefill] if self.backend.cfg.n_linear_heads == 0 else [[x] for x in plan.prefill]
        for group in groups:
            if not group:
                continue
            for s, n, row in self._forward(group, False, fail):
                s.num_computed += n
                if s.remaining == 0:
                    sampled.append(s)
                    rows.append(row)
        if not sampled:
            return [], []
        outs = self._sample(sampled, rows, fail)
        kept = [(s, o) for s, o in zip(sampled, outs) if o is not None]
        return [s for s, _ in kept], [o for _, o in kept]

    def _batch_forward(self, group: list[tuple[Sequence, int]], decode: bool) -> list[torch.Tensor]:
        """One forward over (sequence, n new tokens) rows -> per row the logits [V] of its last new token."""
        T = max(n for _, n in group)
        toks = [s.tokens[s.num_computed:s.num_computed + n] for s, n in group]
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in toks], device=self.backend.device)  # [B, T]
        batch = PagedBatch(self.pool, [s.table for s, _ in group], [s.num_computed for s, _ in group], T,
                           [s.slot for s, _ in group], None if decode else [n for _, n in group])
        logits = self.backend.forward(tokens, batch)  # [B, T, V]
        return [logits[i, n - 1] for i, (_, n) in enumerate(group)]

    def _forward(self, group, decode: bool, fail) -> list[tuple[Sequence, int, torch.Tensor]]:
        """_batch_forward, isolating a failure: a pure-softmax model reruns each row alone (a rerun rewrites the
        same K/V positions), so only the rows that fail alone fail; a hybrid's linear state may already have
        advanced, so every row of the failed forward fails."""
        try:
            return [(s, n, row) for (s, n), row in zip(group, self._batch_forward(group, decode))]
        except Exception as e:  # noqa: BLE001
            if fail is _raise or len(group) == 1 or self.backend.cfg.n_linear_heads:
                for s, _ in group:
                    fail(s, e)
                return []
        out = []
        for s, n in group:
            try:
                out.append((s, n, self._batch_forward([(s, n)], decode)[0]))
            except Exception as e:  # noqa: BLE001
                fail(s, e)
        return out

    def _sample(self, seqs: list[Sequence], rows: list[torch.Tensor], fail) -> list[SampleOut | None]:
        """One batched sample; if it fails, each row alone (a row's draw depends only on its own seed and step,
        so the others get the same tokens), and the rows that fail alone fail (None)."""
        try:
            return sample_batch(torch.stack(rows), seqs)
        except Exception:  # noqa: BLE001
            if fail is _raise:
                raise
        outs: list[SampleOut | None] = []
        for s, row in zip(seqs, rows):
            try:
                outs.append(sample_batch(row.unsqueeze(0), [s])[0])
            except Exception as e:  # noqa: BLE001
                fail(s, e)
                outs.append(None)
        return outs


def _raise(s: Sequence, err: BaseException) -> None:
    raise err
