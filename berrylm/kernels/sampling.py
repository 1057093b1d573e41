"""Token sampling: the one definition of the math (PyTorch reference) and its dispatch.

Per row of a [B, V] logits batch, with per-row parameters:
  1. penalties and logit bias (`apply_penalties`), OpenAI/vLLM semantics;
  2. temperature == 0 -> greedy argmax; otherwise logits / temperature, then the top_k, top_p and min_p
     filters (each off at 0 / 1.0 / 0.0);
  3. a draw by Gumbel-max with counter-based noise: u = hash(seed, step, token) so the same
     (seed, step) gives the same token whatever else is in the batch, on every device.
The chosen token's logprob is log_softmax of the penalised logits (before temperature and filters),
the model's own distribution, as OpenAI reports it.
"""

from __future__ import annotations

import os

import torch

_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on the low 32 bits of an int64 tensor (result in [0, 2^32))."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed, step: [B] int64 -> [B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token)."""
    base = hash32(hash32((seed & _M32) ^ hash32(seed >> 32)) + step)  # [B]
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = hash32(base.unsqueeze(1) + idx.unsqueeze(0) * 0x9E3779B1)  # [B, V]
    return (h.double() + 0.5).div(2.0 ** 32).float()


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                    logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V]; counts [B, V]: times each token was generated so far; presence, frequency,
    repetition: [B] (0, 0, 1 = off); prompt_mask [B, V] bool: token occurs in the prompt (repetition
    penalty covers prompt + output, as in vLLM); logit_bias [B, V] added last. Returns new logits."""
    logits = logits.float()
    seen = counts > 0
    if prompt_mask is not None:
        seen = seen | prompt_mask
    rep = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).float()
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Scaled logits with the tokens each row's filters drop set to -inf. [B, V] -> [B, V].
    Rows with temperature 0 are scaled by 1 (they are decided greedily)."""
    B, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    x = logits.float() / t
    sorted_x, order = x.sort(dim=1, descending=True)
    keep = torch.ones_like(sorted_x, dtype=torch.bool)
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
    keep &= torch.arange(V, device=x.device).unsqueeze(0) < k.unsqueeze(1)
    probs = sorted_x.softmax(dim=1)
    before = probs.cumsum(dim=1) - probs  # mass strictly before each token
    keep &= before < top_p.unsqueeze(1)
    keep &= probs >= min_p.unsqueeze(1) * probs[:, :1]
    keep[:, 0] = True  # the most likely token always survives
    mask = torch.zeros_like(keep).scatter(1, order, keep)
    return x.masked_fill(~mask, float("-inf"))


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (penalties already applied); temperature, top_p, min_p: [B] float; top_k, seed,
    step: [B] int64. Returns tokens [B] int64 and their logprobs [B] float32."""
    logits = logits.float()
    x = filter_logits(logits, temperature, top_k, top_p, min_p)
    u = uniform_noise(seed, step, logits.shape[1])
    gumbel = -torch.log(-torch.log(u))
    drawn = (x + gumbel).argmax(dim=1)
    greedy = logits.argmax(dim=1)
    tokens = torch.where(temperature > 0, drawn, greedy)
    logprobs = logits.log_softmax(dim=1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the fused Triton sampler on CUDA when available, the reference elsewhere."""
    if logits.is_cuda or os.environ.get("BERRY_FORCE_TRITON", "") == "1":  # forced: tests, interpreter
        try:
            from berrylm.kernels.triton_sampling import sample_triton
        except ImportError:
            pass
        else:
            return sample_triton(logits, temperature, top_k, top_p, min_p, seed, step)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seed, step)
