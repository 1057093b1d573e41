"""The PyTorch references of kernels/: linear attention (chunked == recurrence, decode step == prefill,
state carried across calls, gradients) and sampling (greedy, filters, noise, distribution, determinism)."""

from __future__ import annotations

import math

import pytest
import torch

from berrylm.kernels.linear_attention import (
    empty_state,
    feature_map,
    linear_attention,
    linear_attention_ref,
    linear_attention_step_ref,
)
from berrylm.kernels.sampling import filter_logits, hash32, sample_ref, uniform_noise


def naive_recurrence(q, k, v, gate, state):
    """Token-by-token definition from the module docstring, in float64."""
    B, T, H, D = q.shape
    S, z = (s.double().clone() for s in state)
    qf, kf, vf = feature_map(q.double()), feature_map(k.double()), v.double()
    out = []
    for t in range(T):
        S = S + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)  # [B, H, D, D]
        z = z + kf[:, t]
        num = (qf[:, t].unsqueeze(-2) @ S).squeeze(-2)
        den = (qf[:, t] * z).sum(-1, keepdim=True)
        o = num / (den + 1e-6)
        if gate is not None:
            o = o * torch.sigmoid(gate[:, t].double()).unsqueeze(-1)
        out.append(o)
    return torch.stack(out, 1), (S, z)


def rand_qkv(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    return q, k, v, torch.randn(B, T, H, generator=g)


@pytest.mark.parametrize("B,T,H,D,chunk", [(2, 37, 3, 8, 16), (1, 64, 2, 16, 64), (3, 5, 1, 4, 64), (1, 129, 2, 8, 32)])
@pytest.mark.parametrize("gated", [True, False])
def test_chunked_equals_recurrence(B, T, H, D, chunk, gated):
    q, k, v, gate = rand_qkv(B, T, H, D)
    gate = gate if gated else None
    g = torch.Generator().manual_seed(1)
    state = (torch.rand(B, H, D, D, generator=g), torch.rand(B, H, D, generator=g))
    o, (S, z) = linear_attention_ref(q, k, v, gate, state, chunk=chunk)
    o2, (S2, z2) = naive_recurrence(q, k, v, gate, state)
    torch.testing.assert_close(o.double(), o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.double(), S2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z.double(), z2, rtol=1e-5, atol=1e-4)


def test_state_carried_across_calls():
    q, k, v, gate = rand_qkv(2, 50, 2, 8)
    o, (S, z) = linear_attention_ref(q, k, v, gate)
    o1, st = linear_attention_ref(q[:, :23], k[:, :23], v[:, :23], gate[:, :23])
    o2, (S2, z2) = linear_attention_ref(q[:, 23:], k[:, 23:], v[:, 23:], gate[:, 23:], st)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z)


def test_step_equals_prefill_of_one_token_with_slots():
    B, H, D, N = 3, 2, 8, 6
    q, k, v, gate = rand_qkv(B, 1, H, D, seed=3)
    g = torch.Generator().manual_seed(4)
    S_pool, z_pool = torch.rand(N, H, D, D, generator=g), torch.rand(N, H, D, generator=g)
    slots = torch.tensor([5, 0, 3])
    before_S, before_z = S_pool.clone(), z_pool.clone()
    o = linear_attention_step_ref(q[:, 0], k[:, 0], v[:, 0], gate[:, 0], S_pool, z_pool, slots)
    o2, (S2, z2) = linear_attention_ref(q, k, v, gate, (before_S[slots], before_z[slots]))
    torch.testing.assert_close(o, o2[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S_pool[slots], S2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_pool[slots], z2)
    untouched = torch.tensor([1, 2, 4])
    assert torch.equal(S_pool[untouched], before_S[untouched]) and torch.equal(z_pool[untouched], before_z[untouched])


def test_half_inputs_accumulate_in_fp32():
    q, k, v, gate = rand_qkv(1, 40, 2, 16)
    o, (S, _) = linear_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), gate.bfloat16())
    o32, _ = linear_attention_ref(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                                  gate.bfloat16().float())
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(o.float(), o32, rtol=1e-2, atol=1e-2)


def test_dispatch_on_cpu_is_the_reference_and_differentiable():
    q, k, v, gate = rand_qkv(2, 20, 2, 8)
    q.requires_grad_(True)
    o, st = linear_attention(q, k, v, gate)
    o_ref, _ = linear_attention_ref(q, k, v, gate)
    assert torch.equal(o, o_ref)
    o.square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    S, z = empty_state(1, 1, 4)
    assert S.shape == (1, 1, 4, 4) and z.shape == (1, 1, 4) and S.dtype == torch.float32


# ---------------------------------------------------------------- sampling

def params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=None):
    full = lambda x, dt: torch.full((B,), x, dtype=dt)  # noqa: E731
    step = torch.arange(B) if step is None else full(step, torch.int64)
    return (full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            full(min_p, torch.float32), full(seed, torch.int64), step)


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson chi-square of sampled tokens against probs [V], bins with expected < 5 merged; the critical
    value at p = 1e-4 by the Wilson-Hilferty approximation. Tokens of zero probability fail outright."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    if counts[probs == 0].sum() > 0:
        return False, float("inf"), 0.0
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    ex = torch.cat([exp[big], exp[~big].sum().view(1)])
    obs, ex = obs[ex > 0], ex[ex > 0]
    stat = ((obs - ex) ** 2 / ex).sum().item()
    dof = max(obs.numel() - 1, 1)
    z = 3.72  # one-sided p = 1e-4
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit, stat, crit


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 4
    tok, lp = sample_ref(logits, *params(5, temperature=0.0, top_k=3, top_p=0.5))
    assert torch.equal(tok, logits.argmax(1))
    torch.testing.assert_close(lp, logits.log_softmax(1).gather(1, tok[:, None])[:, 0])
    tok, lp = sample_ref(logits, *params(5, temperature=0.7))  # logprob of the unscaled logits
    torch.testing.assert_close(lp, logits.log_softmax(1).gather(1, tok[:, None])[:, 0])


def test_filters():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    one = lambda x, dt=torch.float32: torch.tensor([x], dtype=dt)  # noqa: E731
    kept = lambda t, k, p, m: torch.isfinite(filter_logits(logits, one(t), one(k, torch.int64), one(p),  # noqa: E731
                                                            one(m)))[0].tolist()
    assert kept(1.0, 2, 1.0, 0.0) == [True, False, True, False, False]
    probs = logits.softmax(1)[0]  # sorted: 0.665, 0.245, 0.090, ...
    assert probs[0] < 0.7 < probs[0] + probs[2]
    assert kept(1.0, 0, 0.7, 0.0) == [True, False, True, False, False]
    assert kept(1.0, 0, 0.6, 0.0) == [True, False, False, False, False]
    assert kept(1.0, 0, 1.0, 0.3) == [True, False, True, False, False]  # e^-1 = 0.37 >= 0.3 > e^-2
    assert kept(1.0, 0, 0.0, 0.0) == [True, False, False, False, False]  # top token always survives
    assert kept(1.0, 0, 1.0, 0.0) == [True] * 5


def test_uniform_noise_is_a_pure_function():
    seed, step = torch.tensor([7, 7, 2 ** 40 + 7, 7]), torch.tensor([3, 4, 3, 3])
    u = uniform_noise(seed, step, 1000)
    assert u.shape == (4, 1000) and (u > 0).all() and (u < 1).all()
    assert torch.equal(u[0], u[3]) and not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(u.mean().item() - 0.5) < 0.02
    assert hash32(torch.tensor([0])).item() == 0 and hash32(torch.tensor([1])).item() != 1


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 10, 1.0, 0.0),
                                                           (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
                                                           (0.9, 12, 0.9, 0.05)])
def test_sample_ref_distribution_chi_square(temperature, top_k, top_p, min_p):
    V, n = 64, 20000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2
    p = params(n, temperature, top_k, top_p, min_p, seed=11)
    tokens, _ = sample_ref(logits.expand(n, V), *p)
    probs = filter_logits(logits, *(x[:1] for x in p[:4])).softmax(1)[0]
    ok, stat, crit = chi_square_ok(tokens, probs)
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"
    if top_k or top_p < 1 or min_p:
        assert (probs == 0).any()  # the filter really dropped something


def test_sample_is_deterministic_across_batch_composition():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 100, generator=g)
    t, k, p, m, _, _ = params(6, temperature=1.0, top_k=20, top_p=0.95)
    seed, step = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([9, 8, 7, 6, 5, 4])
    tok, lp = sample_ref(logits, t, k, p, m, seed, step)
    for rows in ([3], [5, 0], [2, 4, 1]):
        r = torch.tensor(rows)
        tok2, lp2 = sample_ref(logits[r], t[r], k[r], p[r], m[r], seed[r], step[r])
        assert torch.equal(tok2, tok[r]) and torch.equal(lp2, lp[r])
    other = sample_ref(logits, t, k, p, m, seed, step + 1)[0]
    assert not torch.equal(other, tok)  # a different step draws anew


@pytest.mark.parametrize("V", [4096, 49152])
def test_top_p_one_keeps_every_token(V):
    """top_p = 1 means off. An fp32 cumulative sum over a real vocabulary rounds past 1 before the tail: the
    reference used to drop 43-117 tokens per row at V = 4,096 and 2,351-3,288 at SmolLM2's 49,152."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(8, V, generator=g) * 3
    kept = torch.isfinite(filter_logits(logits, *params(8, temperature=1.0)[:4]))
    assert kept.all(), (~kept).sum(1)
    # just under 1, the dropped tail is the few tokens whose mass lies past top_p, not thousands
    p = params(8, temperature=1.0, top_p=1 - 1e-7)
    dropped = (~torch.isfinite(filter_logits(logits, *p[:4]))).sum(1)
    probs = logits.double().softmax(1).sort(1, descending=True).values
    rest = 1 - p[2][0].double().item()  # 1 - top_p as the fp32 top_p really is
    tail = (probs.flip(1).cumsum(1) <= rest).sum(1)  # tokens whose mass from the end stays within 1 - top_p
    assert (dropped <= tail + 1).all(), (dropped, tail)


def test_filters_without_sort_match_sorted_definition():
    """top_k alone (no sort, a k-th-value threshold) and min_p alone agree with the sorted definition."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 700, generator=g) * 2
    k = torch.tensor([1, 5, 50, 699, 700, 0])
    kept = torch.isfinite(filter_logits(logits, torch.ones(6), k, torch.ones(6), torch.zeros(6)))
    want = torch.where((k > 0) & (k < 700), k, torch.full_like(k, 700))
    assert torch.equal(kept.sum(1), want)
    rank = logits.argsort(1, descending=True).argsort(1)  # 0 = most likely
    assert (rank[kept] < want.repeat_interleave(want)).all()
    m = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
    kept = torch.isfinite(filter_logits(logits, torch.ones(6), torch.zeros(6, dtype=torch.int64), torch.ones(6), m))
    p = logits.softmax(1)
    assert torch.equal(kept, p >= m.unsqueeze(1) * p.max(1, keepdim=True).values * (1 - 1e-6))


def test_dispatch_version_floor_and_switch(monkeypatch):
    """Triton older than 3.3 is treated as absent (3.1/3.2 abort the process compiling the forward on sm_90);
    BERRY_FORCE_TRITON=0 turns the kernels off, =1 forces them off CUDA; the verdict is computed once."""
    triton = pytest.importorskip("triton")
    from berrylm.kernels import dispatch

    x = torch.zeros(2)
    monkeypatch.setattr(dispatch, "triton_problem", dispatch._find_problem)
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert "older than 3.3" in dispatch.triton_problem()
    monkeypatch.setenv("BERRY_FORCE_TRITON", "1")
    assert not dispatch.use_triton(x)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert dispatch.triton_problem() is None and dispatch.use_triton(x)
    monkeypatch.setenv("BERRY_FORCE_TRITON", "0")
    assert not dispatch.use_triton(x)
    monkeypatch.delenv("BERRY_FORCE_TRITON")
    assert not dispatch.use_triton(x)  # CPU tensors run the references


def test_noise_stays_inside_the_unit_interval():
    """Seed 2395, step 0 hashes token 27,185 to 2^32 - 53: the old (h + 0.5) / 2^32 rounded that to exactly 1.0 in
    fp32, its Gumbel noise was +inf, and with the token filtered out (-inf) the score was NaN, which argmax picks:
    the sampler drew a token its filters had dropped (found by the chi-square test on an H200)."""
    from berrylm.kernels.sampling import unit_interval

    h = torch.tensor([0, 1, 511, 512, 2 ** 32 - 53, 2 ** 32 - 1])
    u = unit_interval(h)
    assert (u > 0).all() and (u < 1).all()
    assert torch.equal(u.double() * 2 ** 24, ((h >> 9) * 2 + 1).double())  # exact: (2k + 1) / 2^24
    V = 49152
    u = uniform_noise(torch.tensor([2395]), torch.tensor([0]), V)
    assert u.max() < 1 and u[0].argmax() == 27185
    logits = torch.full((1, V), -30.0)
    logits[0, :10] = 5.0  # top_k = 10 or top_p = 0.5 keep (some of) tokens 0-9; token 27,185 has the extreme noise
    for top_k, top_p in ((10, 1.0), (0, 0.5)):
        tok, _ = sample_ref(logits, *params(1, 1.0, top_k, top_p, 0.0, seed=2395, step=0))
        assert tok.item() < 10, tok
