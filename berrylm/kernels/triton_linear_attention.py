"""Triton kernels for gated causal linear attention (math and contract: kernels/linear_attention.py).

Prefill/training: one program per (sequence, head, block of value columns) walks the sequence chunk by
chunk, holding the running state S [D, D] and normaliser z [D] in registers (fp32):

    o_c = sigmoid(g_c) * (phi(q_c) S + tril(phi(q_c) phi(k_c)^T) v_c) / (phi(q_c) z + rowsum(tril(..)) + eps)
    S  += phi(k_c)^T v_c,   z += colsum(phi(k_c))

Value columns are independent (only z couples them, and z needs keys only), so splitting them across
programs adds parallelism for small batches. The backward pass recomputes the chunked reference under
autograd (exact same math, memory O(T * D) per head), so training on GPU can use the fast forward; a Triton
backward is future work (the backward then runs at the eager reference's speed). Under torch.compile
(`berry train --compile`) the forward is a graph break (`torch.compiler.disable`), so compiled training calls
it eagerly; bench/gpu_check.sh trains the hybrid with --compile to check that path on a real GPU.
Launch configs, precision and the fallback when a GPU's shared memory fits none of them: see _FWD_CONFIGS.

Decode: one program per (sequence, head) loads the state slot, adds phi(k) v^T, writes it back in place
and reads out o, all in one launch for the whole batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from berrylm.kernels.dispatch import is_out_of_resources, on_device, warn_once
from berrylm.kernels.linear_attention import CHUNK, EPS, LinearState, linear_attention_ref


@triton.jit
def _phi(x):  # elu(x) + 1, written like the reference (elu then + 1) so rounding matches
    return tl.where(x > 0, x, tl.exp(x) - 1.0) + 1.0


@triton.jit
def _la_fwd_kernel(Q, K, V, G, S0, Z0, OUT, S1, Z1, T, H,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgb, sgt, sob, sot, soh,
                   HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, CH: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    b, h = (pid // H).to(tl.int64), pid % H  # int64: b * stride passes 2^31 at large B * T * H * D; each
    # pointer below is (X + b * stride) first, a scalar, so the per-token tensor offsets stay int32
    dv0 = tl.program_id(1) * BLOCK_DV
    rows = tl.arange(0, CH)
    dk = tl.arange(0, BLOCK_D)  # key dim (full)
    dv = dv0 + tl.arange(0, BLOCK_DV)  # this program's value columns
    kmask, vmask = dk < D, dv < D
    state = (b * H + h).to(tl.int64) * D
    if HAS_STATE:
        S = tl.load(S0 + state * D + dk[:, None] * D + dv[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
        z = tl.load(Z0 + state + dk, mask=kmask, other=0.0)
    else:
        S = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        z = tl.zeros([BLOCK_D], dtype=tl.float32)
    causal = rows[:, None] >= rows[None, :]  # [CH, CH]
    for c0 in range(0, T, CH):
        t = c0 + rows  # int32: offsets within one sequence (t * stride) stay below 2^31
        tmask = t < T
        mk = tmask[:, None] & kmask[None, :]
        mv = tmask[:, None] & vmask[None, :]
        q = tl.load(Q + b * sqb + t[:, None] * sqt + h * sqh + dk[None, :], mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + b * skb + t[:, None] * skt + h * skh + dk[None, :], mask=mk, other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + t[:, None] * svt + h * svh + dv[None, :], mask=mv, other=0.0).to(tl.float32)
        qf = tl.where(mk, _phi(q), 0.0)  # padding must be 0 after phi (phi(0) = 1)
        kf = tl.where(mk, _phi(k), 0.0)
        a = tl.dot(qf, tl.trans(kf), input_precision=PREC)  # [CH, CH]
        a = tl.where(causal, a, 0.0)
        num = tl.dot(qf, S, input_precision=PREC) + tl.dot(a, v, input_precision=PREC)  # [CH, BLOCK_DV]
        den = tl.sum(qf * z[None, :], axis=1) + tl.sum(a, axis=1)  # [CH]
        o = num / (den[:, None] + 1e-6)
        if HAS_GATE:
            g = tl.load(G + b * sgb + t * sgt + h, mask=tmask, other=0.0).to(tl.float32)
            o = o * tl.sigmoid(g)[:, None]
        tl.store(OUT + b * sob + t[:, None] * sot + h * soh + dv[None, :], o.to(OUT.dtype.element_ty), mask=mv)
        S += tl.dot(tl.trans(kf), v, input_precision=PREC)
        z += tl.sum(kf, axis=0)
    tl.store(S1 + state * D + dk[:, None] * D + dv[None, :], S, mask=kmask[:, None] & vmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(Z1 + state + dk, z, mask=kmask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"linear attention wants q, k, v [B, T, H, D] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# The forward's launch configs, (BLOCK_DV, CH, num_warps, num_stages, input_precision), best first. A GPU with
# less shared memory than the first needs (Triton raises OutOfResources at launch) gets the next; the first that
# launched is remembered per (device, D, dtype, split). Compiled for sm_80/86/90 on CPU (registers, spills and
# shared memory are checked by tests/test_triton_compile.py; Triton 3.9, bf16 inputs unless said):
#   * 8 warps: at 4 the forward used 255 registers and spilled 40 B per thread on sm_90 at D <= 64;
#   * D = 128: a [64, 64] value block spilled 960 B; BLOCK_DV 32 with 32-token chunks spills nothing (36 KB);
#   * fp32 inputs: loads pipelined over 3 stages doubled shared memory (64 -> 128 KB at D = 64): 1 stage. The
#     dots follow torch.get_float32_matmul_precision(): "highest" (torch's default) -> "tf32x3", three tf32
#     products with fp32-level error (32 KB, ~100 B of spills at D = 64: fp32 is not the fast path), else "tf32".
#     "ieee" (no tensor cores) spilled 13-54 KB per thread and needed up to 272 KB of shared memory.
#   * half inputs use "tf32": phi(q), phi(k) are formed in fp32, so their products carry tf32's 2^-11 relative
#     rounding (S errors ~4e-3 absolute on unit-scale data), under the bf16/fp16 rounding of the output.
_FWD_CONFIGS: dict[tuple, tuple[int, int, int, int, str] | None] = {}


def _fwd_candidates(BLOCK_D: int, dtype: torch.dtype, split: bool, cuda: bool) -> list[tuple[int, int, int, int, str]]:
    if not cuda:  # the interpreter (tests): one program per (sequence, head), precision is ignored there
        return [(BLOCK_D, CHUNK, 4, 1, "ieee")]
    dv = min(BLOCK_D // 2 if split else BLOCK_D, 64)
    if dtype != torch.float32:
        first = (dv, CHUNK, 8, 3, "tf32") if BLOCK_D <= 64 else (32, 32, 8, 3, "tf32")
        cands = [first, (min(dv, 32), 32, 8, 2, "tf32"), (16, 16, 4, 1, "tf32")]
    elif torch.get_float32_matmul_precision() == "highest":
        cands = [(min(dv, 32), 32, 8, 1, "tf32x3"), (16, 32, 8, 1, "tf32x3"), (16, 16, 4, 1, "tf32x3")]
    else:
        first = (dv, CHUNK, 8, 1, "tf32") if BLOCK_D <= 64 else (32, 32, 8, 1, "tf32")
        cands = [first, (min(dv, 32), 32, 8, 1, "tf32"), (16, 16, 4, 1, "tf32")]
    return list(dict.fromkeys(cands))


class _NoLaunchConfig(RuntimeError):
    """No forward config fits this GPU's shared memory / registers: the caller falls back to the reference."""


def _forward(q, k, v, gate, S0, z0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v)
    B, T, H, D = q.shape
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    S1 = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32)
    z1 = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    has_state = S0 is not None
    if has_state:
        S0, z0 = S0.float().contiguous(), z0.float().contiguous()
    if gate is not None:
        gate = _last_dim_contiguous(gate)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # split value columns when there are too few (sequence, head) pairs to fill the GPU
    split = not (B * H >= 128 or BLOCK_D <= 32)
    key = (q.device, D, q.dtype, split, torch.get_float32_matmul_precision())
    cands = _fwd_candidates(BLOCK_D, q.dtype, split, q.is_cuda)
    if key in _FWD_CONFIGS:
        if _FWD_CONFIGS[key] is None:
            raise _NoLaunchConfig(f"no linear-attention forward config fits {q.device} at D={D}")
        cands = [_FWD_CONFIGS[key]]
    g = gate if gate is not None else q  # dummy pointer when there is no gate
    for cfg in cands:
        BLOCK_DV, CH, warps, stages, prec = cfg
        try:
            with on_device(q):
                _la_fwd_kernel[(B * H, triton.cdiv(D, BLOCK_DV))](
                    q, k, v, g, S0 if has_state else S1, z0 if has_state else z1, o, S1, z1, T, H,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), o.stride(0), o.stride(1),
                    o.stride(2), HAS_GATE=gate is not None, HAS_STATE=has_state, D=D, BLOCK_D=BLOCK_D,
                    BLOCK_DV=BLOCK_DV, CH=CH, PREC=prec, num_warps=warps, num_stages=stages)
        except Exception as e:
            if not is_out_of_resources(e):
                raise
            continue
        _FWD_CONFIGS[key] = cfg
        return o, S1, z1
    _FWD_CONFIGS[key] = None
    raise _NoLaunchConfig(f"no linear-attention forward config fits {q.device} at D={D}")


class _LinearAttention(torch.autograd.Function):
    """Triton forward; backward = autograd through the chunked reference, recomputed from the inputs."""

    @staticmethod
    def forward(ctx, q, k, v, gate, S0, z0):
        ctx.save_for_backward(q, k, v, gate, S0, z0)
        return _forward(q, k, v, gate, S0, z0)

    @staticmethod
    def backward(ctx, do, dS, dz):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(n) if x is not None else None for x, n in zip(saved, need)]
            q, k, v, gate, S0, z0 = leaves
            state = (S0, z0) if S0 is not None else None
            o, (S1, z1) = linear_attention_ref(q, k, v, gate, state)
            outs, grads = [o], [do]
            for y, gy in ((S1, dS), (z1, dz)):
                if gy is not None and y.requires_grad:
                    outs.append(y)
                    grads.append(gy)
            inputs = [x for x, n in zip(leaves, need) if x is not None and n]
            got = iter(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
        return tuple(next(got) if x is not None and n else None for x, n in zip(leaves, need))


@torch.compiler.disable  # a graph break under torch.compile: the launch-config search and fallback stay eager
def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None,
                            state: LinearState | None = None) -> tuple[torch.Tensor, LinearState]:
    """Same contract as linear_attention_ref: q, k, v [B, T, H, D]; gate [B, T, H] or None; state (S, z) or
    None. Returns o [B, T, H, D] (dtype of q) and the final state (fp32). Differentiable."""
    S0, z0 = state if state is not None else (None, None)
    try:
        o, S1, z1 = _LinearAttention.apply(q, k, v, gate, S0, z0)
    except _NoLaunchConfig as e:
        warn_once(f"la-fwd-{q.device}-{q.shape[-1]}-{q.dtype}", f"{e}; using the PyTorch reference there")
        return linear_attention_ref(q, k, v, gate, state)
    return o, (S1, z1)


@triton.jit
def _la_step_kernel(Q, K, V, G, S, Z, SLOTS, OUT, H, sqb, sqh, skb, skh, svb, svh, sgb, sob, soh,
                    HAS_GATE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b, h = (pid // H).to(tl.int64), pid % H
    d = tl.arange(0, BLOCK_D)
    m = d < D
    m2 = m[:, None] & m[None, :]
    q = tl.load(Q + b * sqb + h * sqh + d, mask=m, other=0.0).to(tl.float32)
    k = tl.load(K + b * skb + h * skh + d, mask=m, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + d, mask=m, other=0.0).to(tl.float32)
    qf = tl.where(m, _phi(q), 0.0)
    kf = tl.where(m, _phi(k), 0.0)
    slot = tl.load(SLOTS + b).to(tl.int64)
    state = (slot * H + h) * D
    s_ptr = S + state * D + d[:, None] * D + d[None, :]
    s = tl.load(s_ptr, mask=m2, other=0.0) + kf[:, None] * v[None, :]  # [D, D]
    zz = tl.load(Z + state + d, mask=m, other=0.0) + kf
    tl.store(s_ptr, s, mask=m2)
    tl.store(Z + state + d, zz, mask=m)
    num = tl.sum(qf[:, None] * s, axis=0)  # [D]
    den = tl.sum(qf * zz, axis=0)
    o = num / (den + 1e-6)
    if HAS_GATE:
        o = o * tl.sigmoid(tl.load(G + b * sgb + h).to(tl.float32))
    tl.store(OUT + b * sob + h * soh + d, o.to(OUT.dtype.element_ty), mask=m)


def linear_attention_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                                 S: torch.Tensor, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as linear_attention_step_ref: q, k, v [B, H, D]; gate [B, H] or None; S [N, H, D, D] and
    z [N, H, D] fp32 pools updated in place at rows `slots` [B] (distinct). Returns o [B, H, D]."""
    B, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"decode step wants q, k, v [B, H, D] of one shape, got {tuple(q.shape)}")
    if S.dtype != torch.float32 or z.dtype != torch.float32 or not (S.is_contiguous() and z.is_contiguous()):
        raise ValueError("linear attention state pools must be contiguous float32 tensors")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    slots = slots.to(q.device)
    o = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    g = gate if gate is not None else q
    BLOCK_D = max(16, triton.next_power_of_2(D))
    with on_device(q):
        _la_step_kernel[(B * H,)](
            q, k, v, g, S, z, slots, o, H, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), g.stride(0), o.stride(0), o.stride(1),
            HAS_GATE=gate is not None, D=D, BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_D <= 64 else 8)
    return o


assert EPS == 1e-6  # the kernels hard-code the reference's epsilon
