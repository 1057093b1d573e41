"""Fused Triton sampler (math and contract: kernels/sampling.py, `sample_ref`). One program per row, no sort.

Every filter of the reference keeps a prefix of the row sorted by scaled logit x = logits / temperature,
so each is a threshold on x:
  * top_k: the k-th largest value, found by bisection on the order-preserving integer key of x
    (count(x >= mid) >= k ?), stopping as soon as exactly k survive or no value is left in the interval;
  * top_p: the smallest kept value, where a token is kept while the mass strictly above it is < top_p
    (bisection on mass(x > mid) < top_p * Z, searched only above the top_k threshold);
  * min_p: exp(x - x_max) >= min_p, per token, no search needed.
Then Gumbel-max with the reference's counter-based noise u = hash(seed, step, token), so the draws are
identical to `sample_ref` for the same (seed, step). Passes over the row: 1 (max, argmax, logsumexp) +
one per bisection step (only for rows whose filter is on) + 1 (draw). Values tied exactly at a top_k or
top_p boundary are all kept, as in the reference. top_p >= 1 is off (no search), as in the reference.

Rounding against the reference: x = logits / temperature uses IEEE division (`div_rn`; a plain "/" compiles to
an approximate divide on GPUs), so the thresholds compare the same fp32 values as torch. `exp`/`log` compile to
the GPU's fast approximations and the top_p mass is an fp32 sum in block order (the reference sums in float64),
so a token whose Gumbel score or cumulative mass lies within a few ulps of the winner or of top_p may differ
from `sample_ref`: true near-ties only (tests/test_triton_kernels.py counts them on CUDA).

Known limit: one program per row. With few rows (B <= 64) and a large vocabulary (>= 128k) most SMs idle
and 8-12 bisection passes re-read the row; bench/kernels.py measures it against a sort-based sampler. Splitting
a row over programs (a two-level count) is the next step if that table says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from berrylm.kernels.dispatch import on_device


@triton.jit
def _key(x):  # fp32 -> int64 with the same order (for non-NaN values)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _hash32(x):  # lowbias32 on uint32 (wrapping multiply), as kernels.sampling.hash32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _pivot_pass(base, V, ts, m_x, mids, BLOCK: tl.constexpr, NP: tl.constexpr):
    """One pass over a row for NP pivot keys at once: count(x >= mid), count(x > mid), sum exp(x - m_x)
    over x > mid, each [NP]. Many pivots per pass cut the passes of a bisection by log2(NP + 1)."""
    offs = tl.arange(0, BLOCK)
    c_ge = tl.zeros([NP], tl.int64)
    c_gt = tl.zeros([NP], tl.int64)
    m_gt = tl.zeros([NP], tl.float32)
    for v0 in range(0, V, BLOCK):
        idx = v0 + offs
        x = tl.math.div_rn(tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32), ts)
        kx = tl.where(idx < V, _key(x), -(2 ** 40))[:, None]  # [BLOCK, 1]
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_x))[:, None]
        c_ge += tl.sum((kx >= mids[None, :]).to(tl.int64), axis=0)
        gt = kx > mids[None, :]  # [BLOCK, NP]
        c_gt += tl.sum(gt.to(tl.int64), axis=0)
        m_gt += tl.sum(tl.where(gt, e, 0.0), axis=0)
    return c_ge, c_gt, m_gt


@triton.jit
def _narrow(up, mids, c_ge, c_gt, lo, hi, gt_lo, ge_hi):
    """One bisection round over the pivots `mids` [NP]: the highest pivot where `up` holds becomes lo, the lowest
    where it fails becomes hi; gt_lo / ge_hi carry the counts (x > lo, x >= hi) at the new bounds."""
    lo_new = tl.max(tl.where(up, mids, lo), axis=0)
    gt_lo_new = tl.min(tl.where(up, c_gt, gt_lo), axis=0)
    hi_new = tl.min(tl.where(up, hi, mids), axis=0)
    ge_hi_new = tl.max(tl.where(up, ge_hi, c_ge), axis=0)
    return lo_new, hi_new, gt_lo_new, ge_hi_new


@triton.jit
def _sample_kernel(L, stride, TEMP, TOPK, TOPP, MINP, SEED, STEP, TOK, LP, MASK, V, BLOCK_V: tl.constexpr,
                   BLOCK_S: tl.constexpr, NP: tl.constexpr, WRITE_MASK: tl.constexpr):
    row = tl.program_id(0)
    base = L + row.to(tl.int64) * stride
    temp = tl.load(TEMP + row).to(tl.float32)
    top_k = tl.load(TOPK + row).to(tl.int64)
    top_p = tl.load(TOPP + row).to(tl.float32)
    min_p = tl.load(MINP + row).to(tl.float32)
    seed = tl.load(SEED + row).to(tl.int64)
    step = tl.load(STEP + row).to(tl.int64)
    sample = temp > 0
    ts = tl.where(sample, temp, 1.0)
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # pass 1: raw max / first argmax / sum exp (logprob), scaled max / sum exp (top_p), key range
    m_raw = tl.full([], neg_inf, tl.float32)
    s_raw = tl.zeros([], tl.float32)
    arg = tl.zeros([], tl.int64)
    m_x = tl.full([], neg_inf, tl.float32)
    s_x = tl.zeros([], tl.float32)
    kmin = tl.full([], 2 ** 40, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        msk = idx < V
        lg = tl.load(base + idx, mask=msk, other=neg_inf).to(tl.float32)
        bm = tl.max(lg, axis=0)
        ba = tl.argmax(lg, axis=0).to(tl.int64)
        arg = tl.where(bm > m_raw, v0 + ba, arg)
        new = tl.maximum(m_raw, bm)
        e = tl.where(lg == neg_inf, 0.0, tl.exp(lg - new))
        s_raw = s_raw * tl.where(m_raw == new, 1.0, tl.exp(m_raw - new)) + tl.sum(e, axis=0)
        m_raw = new
        x = tl.math.div_rn(lg, ts)  # IEEE round-to-nearest, as torch: "/" is approximate on GPUs
        new = tl.maximum(m_x, tl.max(x, axis=0))
        e = tl.where(x == neg_inf, 0.0, tl.exp(x - new))
        s_x = s_x * tl.where(m_x == new, 1.0, tl.exp(m_x - new)) + tl.sum(e, axis=0)
        m_x = new
        kmin = tl.minimum(kmin, tl.min(tl.where(msk, _key(x), 2 ** 40), axis=0))
    kmax = _key(m_x)

    # top_k: invariant count(x >= lo) >= k > count(x >= hi); the threshold is lo (c_*: counts at lo, hi)
    lo = kmin - 1
    hi = kmax + 1
    ge_lo = tl.full([], V, tl.int64)
    gt_lo = tl.full([], V, tl.int64)
    ge_hi = tl.zeros([], tl.int64)
    go = sample & (top_k > 0) & (top_k < V)
    while go:
        mids = lo + ((hi - lo) * (tl.arange(0, NP) + 1)) // (NP + 1)  # [NP] pivots in [lo, hi)
        c_ge, c_gt, _ = _pivot_pass(base, V, ts, m_x, mids, BLOCK_S, NP)
        up = c_ge >= top_k
        ge_lo = tl.min(tl.where(up, c_ge, ge_lo), axis=0)
        lo, hi, gt_lo, ge_hi = _narrow(up, mids, c_ge, c_gt, lo, hi, gt_lo, ge_hi)
        go = (hi - lo > 1) & (ge_lo != top_k) & (gt_lo > ge_hi)  # stop: exactly k, or no value in (lo, hi)
    tau_k = lo

    # top_p: invariant mass(x > lo) >= p * Z > mass(x > hi); the threshold is hi. Searched above tau_k only.
    pz = top_p * s_x
    lo = tau_k - 1
    gt_lo = ge_lo
    hi = kmax + 1
    ge_hi = tl.zeros([], tl.int64)
    go = sample & (top_p < 1.0)
    while go:
        mids = lo + ((hi - lo) * (tl.arange(0, NP) + 1)) // (NP + 1)
        c_ge, c_gt, m_gt = _pivot_pass(base, V, ts, m_x, mids, BLOCK_S, NP)
        up = m_gt >= pz
        lo, hi, gt_lo, ge_hi = _narrow(up, mids, c_ge, c_gt, lo, hi, gt_lo, ge_hi)
        go = (hi - lo > 1) & (gt_lo > ge_hi)
    tau = tl.where(sample & (top_p < 1.0), tl.maximum(tau_k, hi), tau_k)
    # draw: Gumbel-max over the kept tokens with the reference's counter-based noise
    h = _hash32(_hash32(seed.to(tl.uint32) ^ _hash32((seed >> 32).to(tl.uint32))) + step.to(tl.uint32))
    best = tl.full([], neg_inf, tl.float32)
    tok = tl.zeros([], tl.int64)
    n = tl.where(sample, V, 0)
    for v0 in range(0, n, BLOCK_V):
        idx = v0 + offs
        msk = idx < V
        x = tl.math.div_rn(tl.load(base + idx, mask=msk, other=neg_inf).to(tl.float32), ts)
        kx = _key(x)
        keep = msk & (((kx >= tau) & (tl.exp(x - m_x) >= min_p)) | (kx == kmax))
        u = _hash32(h + idx.to(tl.uint32) * 0x9E3779B1)
        u = ((u >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (2k + 1) / 2^24, as unit_interval
        score = tl.where(keep, x - tl.log(-tl.log(u)), neg_inf)
        if WRITE_MASK:
            tl.store(MASK + row.to(tl.int64) * V + idx, keep.to(tl.int8), mask=msk)
        bs = tl.max(score, axis=0)
        tok = tl.where(bs > best, v0 + tl.argmax(score, axis=0).to(tl.int64), tok)
        best = tl.maximum(best, bs)
    tok = tl.where(sample, tok, arg)
    lp = tl.load(base + tok).to(tl.float32) - m_raw - tl.log(s_raw)
    tl.store(TOK + row, tok)
    tl.store(LP + row, lp)


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as sample_ref: logits [B, V]; temperature, top_p, min_p [B] float; top_k, seed, step [B]
    int64. Returns tokens [B] int64 and their logprobs [B] float32 (log_softmax of the unscaled logits).
    `mask` (int8 [B, V], optional) receives the kept-token mask of each sampled row."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    mask = logits if mask is None else mask  # dummy pointer when no mask is wanted
    params = [p.contiguous() for p in (temperature, top_k, top_p, min_p, seed, step)]
    tokens = torch.empty(B, device=logits.device, dtype=torch.int64)
    logprobs = torch.empty(B, device=logits.device, dtype=torch.float32)
    cuda = logits.is_cuda
    BLOCK_V = min(triton.next_power_of_2(V), 4096 if cuda else 1 << 16)
    BLOCK_S = min(BLOCK_V, 512 if cuda else 1 << 14)  # search passes hold [BLOCK_S, NP] tiles
    with on_device(logits):
        _sample_kernel[(B,)](logits, logits.stride(0), *params, tokens, logprobs, mask, V, BLOCK_V=BLOCK_V,
                             BLOCK_S=BLOCK_S, NP=16, WRITE_MASK=mask is not logits,
                             num_warps=8 if BLOCK_V >= 2048 else 4)
    return tokens, logprobs


def filter_mask_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor) -> torch.Tensor:
    """The kept-token mask [B, V] bool the sampler draws from, for checking it against the reference's
    `filter_logits` (temperature-0 rows are filtered at temperature 1, as there)."""
    B, V = logits.shape
    mask = torch.zeros(B, V, device=logits.device, dtype=torch.int8)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    zeros = torch.zeros(B, device=logits.device, dtype=torch.int64)
    sample_triton(logits, t, top_k, top_p, min_p, zeros, zeros, mask=mask)
    return mask.bool()
