"""Gated causal linear attention: the one definition of the math (PyTorch reference) and its dispatch.

For one head, with feature map phi(x) = elu(x) + 1 (positive), the recurrent state after token t is

    S_t = S_{t-1} + phi(k_t) v_t^T        # [D, D]  (key dim x value dim)
    z_t = z_{t-1} + phi(k_t)              # [D]     (normaliser)
    o_t = sigmoid(g_t) * (phi(q_t)^T S_t) / (phi(q_t)^T z_t + eps)

g_t is the head's per-token gate logit (computed from x_t alone, so strictly causal). The state is fixed
size whatever the context length. Prefill/training uses a chunked form (exact, autograd-friendly);
decode updates per-sequence state slots in place. On CUDA the Triton kernels in this package run,
everywhere else these references (kernels/dispatch.py decides); callers never branch on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from berrylm.kernels.dispatch import use_triton

EPS = 1e-6
CHUNK = 64

LinearState = tuple[torch.Tensor, torch.Tensor]  # (S [B, H, D, D] fp32, z [B, H, D] fp32)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def empty_state(batch: int, heads: int, dim: int, device=None) -> LinearState:
    return (torch.zeros(batch, heads, dim, dim, device=device, dtype=torch.float32),
            torch.zeros(batch, heads, dim, device=device, dtype=torch.float32))


def linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None,
                         state: LinearState | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, LinearState]:
    """q, k, v: [B, T, H, D]; gate: [B, T, H] logits or None; state: (S, z) or None (zeros).
    Returns o [B, T, H, D] (dtype of q) and the state after the last token (fp32)."""
    B, T, H, D = q.shape
    out_dtype = q.dtype
    qf = feature_map(q.float()).transpose(1, 2)  # [B, H, T, D]
    kf = feature_map(k.float()).transpose(1, 2)
    vf = v.float().transpose(1, 2)
    S, z = state if state is not None else empty_state(B, H, D, q.device)
    outs = []
    for c0 in range(0, T, chunk):
        qc, kc, vc = qf[:, :, c0:c0 + chunk], kf[:, :, c0:c0 + chunk], vf[:, :, c0:c0 + chunk]
        C = qc.shape[2]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        a = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, C, C]
        num = qc @ S + a @ vc  # [B, H, C, D]
        den = (qc @ z.unsqueeze(-1)).squeeze(-1) + a.sum(-1)  # [B, H, C]
        outs.append(num / (den.unsqueeze(-1) + EPS))
        S = S + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(2)
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, D]
    if gate is not None:
        o = o * torch.sigmoid(gate.float()).unsqueeze(-1)
    return o.to(out_dtype), (S, z)


def linear_attention_step_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                              S: torch.Tensor, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One decode step for a batch. q, k, v: [B, H, D]; gate: [B, H] or None; S: [N, H, D, D] and
    z: [N, H, D] state pools (fp32), updated in place at rows `slots` [B] (int64). Returns o [B, H, D]."""
    qf, kf, vf = feature_map(q.float()), feature_map(k.float()), v.float()
    s = S[slots] + kf.unsqueeze(-1) * vf.unsqueeze(-2)  # [B, H, D, D]
    zz = z[slots] + kf  # [B, H, D]
    S[slots] = s
    z[slots] = zz
    num = (qf.unsqueeze(-2) @ s).squeeze(-2)  # [B, H, D]
    den = (qf * zz).sum(-1, keepdim=True)
    o = num / (den + EPS)
    if gate is not None:
        o = o * torch.sigmoid(gate.float()).unsqueeze(-1)
    return o.to(q.dtype)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None,
                     state: LinearState | None = None) -> tuple[torch.Tensor, LinearState]:
    """Dispatch: Triton on CUDA when available, the reference elsewhere. Same contract as the reference."""
    if use_triton(q):
        from berrylm.kernels.triton_linear_attention import linear_attention_triton
        return linear_attention_triton(q, k, v, gate, state)
    return linear_attention_ref(q, k, v, gate, state)


def linear_attention_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                           S: torch.Tensor, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Dispatch for the in-place decode step. Same contract as linear_attention_step_ref."""
    if use_triton(q):
        from berrylm.kernels.triton_linear_attention import linear_attention_step_triton
        return linear_attention_step_triton(q, k, v, gate, S, z, slots)
    return linear_attention_step_ref(q, k, v, gate, S, z, slots)
