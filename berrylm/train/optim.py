"""Optimizers and the learning-rate schedule.

AdamW for everything by default (weight decay on matrices only). With `optimizer="muon"`, the 2-D
hidden matrices (attention and MLP projections; not the embedding, which is also the tied output layer)
use Muon: SGD momentum whose update is orthogonalised by a few Newton-Schulz iterations; the rest stays on
AdamW.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, warmup: int, min_frac: float, decay: str = "cosine") -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then cosine or linear decay to min_frac."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
    if decay == "linear":
        return min_frac + (1 - min_frac) * (1 - t)
    if decay == "constant":
        return 1.0
    raise ValueError(f"unknown decay '{decay}' (cosine, linear, constant)")


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T by a quintic Newton-Schulz iteration (coefficients from the Muon write-up)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.norm() + 1e-7)
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if transpose else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float,
                     muon_lr: float = 0.02, betas=(0.9, 0.95)) -> list[torch.optim.Optimizer]:
    """One or two optimizers; each param group remembers its peak LR in `base_lr` for the schedule."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and n.startswith("layers.")]
        ids = {id(p) for p in hidden}
        rest = [(n, p) for n, p in named if id(p) not in ids]
    elif optimizer == "adamw":
        hidden, rest = [], named
    else:
        raise ValueError(f"unknown optimizer '{optimizer}' (adamw, muon)")
    decay = [p for n, p in rest if p.ndim >= 2]
    no_decay = [p for n, p in rest if p.ndim < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay, "base_lr": lr},
                               {"params": no_decay, "weight_decay": 0.0, "base_lr": lr}],
                              lr=lr, betas=betas, eps=1e-8, fused=False)
    opts: list[torch.optim.Optimizer] = [adamw]
    if hidden:
        muon = Muon(hidden, lr=muon_lr, weight_decay=weight_decay)
        muon.param_groups[0]["base_lr"] = muon_lr
        opts.append(muon)
    return opts


def set_lr(opts: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier
