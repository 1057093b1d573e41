"""The one model every stage shares: llama-style decoder, plus the hybrid "Strawberry" options.

Shapes: B batch, T new tokens, L cached+new length, d model dim, H heads, Hkv kv heads (softmax part),
Hl linear heads, hd head dim, V vocab.

Training calls `model(tokens)` (full causal sequence). Serving calls `model(tokens, cache=...)` where the
cache object (see model/cache.py for the protocol and a contiguous implementation) owns the K/V of the
softmax heads and the fixed-size recurrent state of the linear heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from berrylm.kernels.linear_attention import linear_attention
from berrylm.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # set by Transformer.fuse_for_inference: one fused op (not exported to ONNX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def fused_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a fused inference weight: a float tensor [out, in], or a quantized layer (model/quantize.py)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, 1, hd] (HF "rotate-half" layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, h, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Softmax heads (GQA + RoPE) and linear-attention heads side by side; optional per-token gates."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.hd = layer, cfg.head_dim
        self.n_soft, self.n_lin = cfg.n_softmax_heads, cfg.n_linear_heads
        self.n_kv = cfg.n_kv_cache_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, (self.n_kv + self.n_lin) * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, (self.n_kv + self.n_lin) * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)
        self.wg = nn.Linear(cfg.dim, cfg.n_heads, bias=False) if cfg.head_gate else None
        self.w_fused = None  # [q|k|v|g] rows (a tensor, or an Int8Linear after quantize), set by fuse()
        self.splits: list[int] = []  # their row counts

    def fuse(self) -> None:
        """Inference only: one projection for q, k, v (and the gates) instead of three or four matmuls."""
        ws = [self.wq, self.wk, self.wv] + ([self.wg] if self.wg is not None else [])
        self.w_fused = torch.cat([w.weight.detach() for w in ws])
        self.splits = [w.weight.shape[0] for w in ws]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = None
        if self.w_fused is not None:
            qkv = fused_linear(x, self.w_fused)  # [B, T, q|k|v(|g)]
            q, k, v, *g = qkv.split(self.splits, dim=-1)
            gate = g[0] if g else None
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            gate = self.wg(x) if self.wg is not None else None  # [B, T, H] logits
        q = q.view(B, T, -1, self.hd)  # [B, T, H, hd]
        k = k.view(B, T, -1, self.hd)  # [B, T, Hkv + Hl, hd]
        v = v.view(B, T, -1, self.hd)
        outs = []
        if self.n_soft:
            if not self.n_lin and qkv is not None:  # q|k adjacent in the fused output: one rotation
                qk = apply_rope(qkv[..., :self.splits[0] + self.splits[1]].view(B, T, -1, self.hd), cos, sin)
                qs, ks, vs = qk[:, :, :self.n_soft], qk[:, :, self.n_soft:], v
            else:
                qs = apply_rope(q[:, :, :self.n_soft], cos, sin)
                ks = apply_rope(k[:, :, :self.n_kv], cos, sin)
                vs = v[:, :, :self.n_kv]
            if cache is None:
                o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                                   is_causal=True, enable_gqa=True)
            else:
                k_all, v_all, mask = cache.update_kv(self.layer, ks, vs)  # [B, Hkv, L, hd], mask [B, 1, T, L]
                o = F.scaled_dot_product_attention(qs.transpose(1, 2), k_all, v_all, attn_mask=mask,
                                                   enable_gqa=True)
            o = o.transpose(1, 2)  # [B, T, Hs, hd]
            if gate is not None:
                o = o * torch.sigmoid(gate[:, :, :self.n_soft]).unsqueeze(-1)
            outs.append(o)
        if self.n_lin:
            ql, kl, vl = q[:, :, self.n_soft:], k[:, :, self.n_kv:], v[:, :, self.n_kv:]
            gl = gate[:, :, self.n_soft:] if gate is not None else None
            if cache is None:
                o, _ = linear_attention(ql, kl, vl, gl)
            else:
                o = cache.linear_attend(self.layer, ql, kl, vl, gl)  # [B, T, Hl, hd]
            outs.append(o)
        o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.wo(o.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.w_fused = None  # [gate|up] rows (a tensor, or an Int8Linear after quantize), set by fuse()

    def fuse(self) -> None:
        """Inference only: gate and up projections as one matmul."""
        self.w_fused = torch.cat([self.w_gate.weight.detach(), self.w_up.weight.detach()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_fused is not None:
            g, u = fused_linear(x, self.w_fused).chunk(2, dim=-1)
            return self.w_down(F.silu(g) * u)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MiniExperts(nn.Module):
    """E small SwiGLU experts with a per-token top-k router. Experts are tiny, so every expert runs on
    every token and the router's sparse weights combine them (exact, export-friendly, no gathers)."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.aux_loss = torch.zeros(())
        self.q_gate_up = self.q_down = None  # Int8Linear, set by quantize() for inference

    def quantize(self) -> None:
        """Inference only: every expert's gate|up as one int8 matmul [B, T, d] -> [B, T, 2*E*h], and the weighted
        sum over experts of their down projections as one more ([B, T, E*h] -> [B, T, d]); frees the float ones."""
        from berrylm.model.quantize import Int8Linear

        E, d, h = self.w_gate.shape
        rows = lambda w: w.detach().permute(0, 2, 1).reshape(E * h, d)  # [E, d, h] -> [(e, h), d]
        self.q_gate_up = Int8Linear(torch.cat([rows(self.w_gate), rows(self.w_up)]))
        self.q_down = Int8Linear(self.w_down.detach().reshape(E * h, d).t())  # [d, (e, h)]
        for name in ("w_gate", "w_up", "w_down"):
            setattr(self, name, nn.Parameter(torch.empty(E, 0, 0), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E = self.w_gate.shape[0]
        probs = self.router(x).float().softmax(-1)  # [B, T, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [B, T, k]
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        if self.q_gate_up is not None:
            g, u = self.q_gate_up(x).chunk(2, dim=-1)  # [B, T, E*h] each
            hid = (F.silu(g) * u).unflatten(-1, (E, -1)) * weights.unsqueeze(-1).to(x.dtype)  # [B, T, E, h]
            return self.q_down(hid.flatten(2))
        h = F.silu(torch.einsum("btd,edh->bteh", x, self.w_gate)) * torch.einsum("btd,edh->bteh", x, self.w_up)
        y = torch.einsum("bteh,ehd->bted", h, self.w_down)  # [B, T, E, d]
        out = (y * weights.unsqueeze(-1).to(y.dtype)).sum(2)
        # Switch-style load balancing: E * sum_e (fraction of routed slots to e) * (mean router prob of e)
        frac = torch.zeros_like(probs).scatter(-1, top_i, 1.0).flatten(0, 1).mean(0) / self.top_k
        self.aux_loss = E * (frac * probs.flatten(0, 1).mean(0)).sum()
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MiniExperts(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.experts_top_k)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def fuse(self, release: bool = False) -> None:
        """Transformer.fuse_for_inference for this block (a loader may fuse each block as it arrives); a block
        already fused is left as it is."""
        self.attn_norm.fused = self.mlp_norm.fused = True
        if self.attn.w_fused is not None:
            return
        self.attn.fuse()
        fused = [self.attn.wq, self.attn.wk, self.attn.wv, self.attn.wg]
        if isinstance(self.mlp, SwiGLU):
            self.mlp.fuse()
            fused += [self.mlp.w_gate, self.mlp.w_up]
        if release:
            for m in fused:
                if m is not None:
                    m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual projections (GPT-2 scaling)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight", "mlp.w_down")):
                nn.init.normal_(p, 0.0, out_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the mini-experts from the last forward (0 for llama)."""
        losses = [b.mlp.aux_loss for b in self.layers if isinstance(b.mlp, MiniExperts)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(self, tokens: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (float32). With a cache, T new tokens are appended to it."""
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                positions = cache.positions(T)
            else:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.tok_emb(tokens)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(x)).float()

    def fuse_for_inference(self, release: bool = False) -> Transformer:
        """For serving: concatenate q/k/v(/gate) and gate/up weights and use the fused RMSNorm op (fewer, larger ops
        per token). The fused copies are plain tensors (not in state_dict) taken from the weights as they are now: do
        not train after. release: free each layer's separate weights as soon as they are fused (the model can then
        only serve; for a server that owns the model, this keeps its peak memory at one copy of the weights)."""
        self.norm.fused = True
        for block in self.layers:
            block.fuse(release)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
