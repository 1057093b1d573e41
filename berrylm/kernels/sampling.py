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

import torch

from berrylm.kernels.dispatch import force_triton, use_triton

_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on the low 32 bits of an int64 tensor (result in [0, 2^32))."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1): the top 23 bits k give (2k + 1) / 2^24, every one
    exact in fp32 (so CPU, CUDA and the Triton kernel agree bit for bit) and at most 1 - 2^-24. The earlier
    (h + 0.5) / 2^32 rounded to exactly 1.0 in fp32 for the top 128 hashes: -log(-log(1)) = inf, and a token the
    filters had dropped (-inf) became NaN, which argmax picks. Measured on an H200: 40,000 draws at a 49,152-token
    vocabulary drew filtered tokens (about one draw in 700 at that vocabulary, on any device)."""
    return ((h >> 9).float() + 0.5) * (1.0 / 2 ** 23)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed, step: [B] int64 -> [B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token)."""
    base = hash32(hash32((seed & _M32) ^ hash32(seed >> 32)) + step)  # [B]
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = hash32(base.unsqueeze(1) + idx.unsqueeze(0) * 0x9E3779B1)  # [B, V]
    return unit_interval(h)


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
    Rows with temperature 0 are scaled by 1 (they are decided greedily). Each filter is off at its neutral
    value (top_k 0 or >= V, top_p >= 1, min_p 0) and then costs nothing: with no row filtering by top_k or
    top_p there is no sort. The top_p mass is summed in float64, so a row's total never rounds past top_p
    (an fp32 cumsum over 49k tokens does, and used to drop thousands of tail tokens at top_p = 1).
    Tokens tied with the most likely one are always kept, as are all tokens tied at a top_k boundary."""
    B, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    x = logits.float() / t  # [B, V]
    x_max = x.max(dim=1, keepdim=True).values  # [B, 1]
    use_k = (top_k > 0) & (top_k < V)  # [B]
    use_p = top_p < 1.0
    keep = torch.ones_like(x, dtype=torch.bool)
    sorted_x = None
    if bool(use_p.any()):
        sorted_x, order = x.sort(dim=1, descending=True)
        probs = sorted_x.double().softmax(dim=1)
        before = probs.cumsum(dim=1) - probs  # mass strictly before each token
        kept = (before < top_p.double().unsqueeze(1)) | ~use_p.unsqueeze(1)
        keep = torch.zeros_like(kept).scatter(1, order, kept)
    if bool(use_k.any()):  # the k-th largest value is the threshold (no sort needed for it alone)
        k = torch.where(use_k, top_k, torch.ones_like(top_k))
        top = sorted_x if sorted_x is not None else x.topk(int(k.max()), dim=1).values  # [B, >= max k]
        kth = top.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
        keep &= (x >= kth) | ~use_k.unsqueeze(1)
    if bool((min_p > 0).any()):  # p / p_max = exp(x - x_max)
        keep &= (x - x_max).exp() >= min_p.unsqueeze(1)
    keep |= x == x_max  # the most likely token always survives
    return x.masked_fill(~keep, float("-inf"))


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
    """Dispatch (kernels/dispatch.py): the fused Triton sampler on CUDA where it is the faster, the reference
    elsewhere. Measured on an H200 (bench/results/gpu-2026-12-04.md): the one-program-per-row kernel beats the
    reference at every batch up to a 32k vocabulary (1.0-5.2x) but at 128k only from 256 rows; below that the
    reference's few large torch ops win (0.27-0.71x), so there the reference runs. Same draws either way."""
    B, V = logits.shape
    if use_triton(logits) and (V <= 65536 or B >= 256 or force_triton()):
        from berrylm.kernels.triton_sampling import sample_triton

        return sample_triton(logits, temperature, top_k, top_p, min_p, seed, step)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seed, step)
