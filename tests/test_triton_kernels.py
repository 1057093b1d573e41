"""The Triton kernels against the PyTorch references, on CPU under the Triton interpreter.

`triton.jit` (and triton.language itself) pick interpreter or compiler when they are defined, so the
interpreter must be on before triton is first imported. When this process was not started with
TRITON_INTERPRET=1 (the usual whole-suite run, where anything may have imported triton already), the
tests here skip and `test_all_under_interpreter` runs this file in a fresh pytest subprocess with
TRITON_INTERPRET=1 and BERRY_FORCE_TRITON=1 (so the dispatch functions pick the kernels on CPU).
The interpreter is slow per program, so shapes and draw counts are small.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from berrylm.kernels.linear_attention import linear_attention_ref, linear_attention_step_ref
from berrylm.kernels.sampling import filter_logits, sample, sample_ref
from tests.test_kernels import chi_square_ok, params

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_all_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "BERRY_FORCE_TRITON": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(r"\b(1[0-9]|[2-9][0-9]) passed", r.stdout), r.stdout[-2000:]  # the tests really ran


@pytest.fixture(scope="module")
def tk():
    if not INTERPRETED:
        pytest.skip("runs in a subprocess under TRITON_INTERPRET=1 (test_all_under_interpreter)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERRY_FORCE_TRITON", "1")
        from berrylm.kernels import triton_linear_attention, triton_sampling
        yield SimpleNamespace(la=triton_linear_attention, s=triton_sampling)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- linear attention

@pytest.mark.parametrize("B,T,H,D,gated,with_state", [(2, 77, 3, 32, True, True), (1, 130, 2, 24, False, False),
                                                      (3, 5, 1, 16, True, False), (1, 64, 2, 64, False, True)])
def test_prefill_matches_reference(tk, B, T, H, D, gated, with_state):
    q, k, v = rand(B, T, H, D, seed=1), rand(B, T, H, D, seed=2), rand(B, T, H, D, seed=3)
    gate = rand(B, T, H, seed=4) if gated else None
    state = (rand(B, H, D, D, seed=5).abs(), rand(B, H, D, seed=6).abs()) if with_state else None
    o, (S, z) = tk.la.linear_attention_triton(q, k, v, gate, state)
    o2, (S2, z2) = linear_attention_ref(q, k, v, gate, state)
    assert o.dtype == q.dtype and S.dtype == z.dtype == torch.float32
    torch.testing.assert_close(o, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_inputs(tk, dtype):
    B, T, H, D = 2, 70, 2, 32
    q, k, v = (rand(B, T, H, D, seed=s, dtype=dtype) for s in (1, 2, 3))
    gate = rand(B, T, H, seed=4, dtype=dtype)
    o, (S, z) = tk.la.linear_attention_triton(q, k, v, gate)
    o2, (S2, z2) = linear_attention_ref(q, k, v, gate)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), o2.float(), rtol=1e-2, atol=1e-2)  # one half-precision ulp
    torch.testing.assert_close(S, S2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z2, rtol=1e-5, atol=1e-4)


def test_state_carried_across_calls_and_strided_heads(tk):
    B, T, H, D = 2, 71, 4, 16
    qkv = rand(B, T, 3 * H, D, seed=7)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]  # non-contiguous head slices, as in the model
    gate = rand(B, T, 2 * H, seed=8)[:, :, H:]
    o_all, (S_all, z_all) = linear_attention_ref(q, k, v, gate)
    o1, st = tk.la.linear_attention_triton(q[:, :33], k[:, :33], v[:, :33], gate[:, :33])
    o2, (S, z) = tk.la.linear_attention_triton(q[:, 33:], k[:, 33:], v[:, 33:], gate[:, 33:], st)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_all, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z_all, rtol=1e-5, atol=1e-4)


def test_backward_matches_reference(tk):
    B, T, H, D = 2, 45, 2, 16
    leaves = [rand(B, T, H, D, seed=s) for s in (1, 2, 3)] + [rand(B, T, H, seed=4)]
    leaves += [rand(B, H, D, D, seed=5).abs(), rand(B, H, D, seed=6).abs()]
    grads = []
    for fn in (tk.la.linear_attention_triton, linear_attention_ref):
        xs = [x.clone().requires_grad_(True) for x in leaves]
        o, (S, z) = fn(xs[0], xs[1], xs[2], xs[3], (xs[4], xs[5]))
        (o.sin().sum() + S.mean() + z.square().mean()).backward()
        grads.append([x.grad for x in xs])
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D,gated", [(32, True), (24, False)])
def test_decode_step_matches_reference_with_slot_scatter(tk, D, gated):
    B, H, N = 3, 2, 6
    q, k, v = (rand(B, H, D, seed=s) for s in (1, 2, 3))
    gate = rand(B, H, seed=4) if gated else None
    S, z = rand(N, H, D, D, seed=5).abs(), rand(N, H, D, seed=6).abs()
    S_ref, z_ref = S.clone(), z.clone()
    slots = torch.tensor([4, 0, 2])
    o = tk.la.linear_attention_step_triton(q, k, v, gate, S, z, slots)
    o_ref = linear_attention_step_ref(q, k, v, gate, S_ref, z_ref, slots)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S, S_ref, rtol=1e-6, atol=1e-6)  # the other slots untouched in both
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)


def test_model_forward_and_decode_use_triton(tk, hybrid_checkpoint, monkeypatch):
    from berrylm.model.cache import KVCache
    from berrylm.model.checkpoint import load_checkpoint

    calls = {"prefill": 0, "step": 0}

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(tk.la, "linear_attention_triton", count("prefill", tk.la.linear_attention_triton))
    monkeypatch.setattr(tk.la, "linear_attention_step_triton", count("step", tk.la.linear_attention_step_triton))
    model, _ = load_checkpoint(hybrid_checkpoint)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 32)
        logits = model(tokens[:, :20], cache=cache)
        step = model(tokens[:, 20:], cache=cache)
        full = model(tokens)
    assert calls["prefill"] > 0 and calls["step"] > 0
    os.environ["BERRY_FORCE_TRITON"] = "0"  # the reference path, for comparison (restored below)
    try:
        with torch.no_grad():
            full_ref = model(tokens)
    finally:
        os.environ["BERRY_FORCE_TRITON"] = "1"
    torch.testing.assert_close(full, full_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, full_ref[:, :20], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[:, 0], full_ref[:, 20], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- sampling

def mixed_rows(B, V, seed=0):
    """B rows of logits with varied per-row parameters, some -inf entries (as a grammar mask leaves)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * torch.rand(B, 1, generator=g) * 5
    logits[1, : V // 2] = float("-inf")
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 1.0, 0.5, 2.0, 1.0, 0.8, 1.0, 0.0])[:B]
    top_k = torch.tensor([0, 0, 50, 0, 10, 3, 0, 1, 7, 0, V - 1, 5])[:B]
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.5, 1.0, 0.3, 1.0, 0.95, 0.6, 0.0, 0.5])[:B]
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.05, 0.0, 0.02, 0.2, 0.0, 0.1])[:B]
    seed = torch.tensor([1, 2, 3, 4, 5, 6, 7, 2 ** 40 + 5, 9, 10, 11, 12])[:B]
    return logits, temp, top_k, top_p, min_p, seed


def test_masks_match_filter_logits(tk):
    logits, temp, top_k, top_p, min_p, _ = mixed_rows(12, 500, seed=1)
    mask = tk.s.filter_mask_triton(logits, temp, top_k, top_p, min_p) & torch.isfinite(logits)
    ref = torch.isfinite(filter_logits(logits, temp, top_k, top_p, min_p))
    assert torch.equal(mask, ref), (mask != ref).sum(1)
    assert (mask.sum(1) < 500).sum() >= 9  # the filters really cut


def test_tokens_identical_to_reference(tk):
    logits, temp, top_k, top_p, min_p, seed = mixed_rows(12, 1000, seed=2)
    for s in range(3):
        step = torch.arange(12) + 100 * s
        tok, lp = tk.s.sample_triton(logits, temp, top_k, top_p, min_p, seed, step)
        tok_ref, lp_ref = sample_ref(logits, temp, top_k, top_p, min_p, seed, step)
        assert torch.equal(tok, tok_ref)
        torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    greedy = temp == 0
    assert torch.equal(tok[greedy], logits[greedy].argmax(1))


def test_sample_dispatch_forced_and_half_logits(tk):
    logits, temp, top_k, top_p, min_p, seed = mixed_rows(4, 300, seed=3)
    logits = logits.bfloat16()
    step = torch.arange(4)
    tok, lp = sample(logits, temp, top_k, top_p, min_p, seed, step)  # BERRY_FORCE_TRITON=1: the kernel
    tok_ref, lp_ref = sample_ref(logits, temp, top_k, top_p, min_p, seed, step)
    assert torch.equal(tok, tok_ref)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.8, 6, 1.0, 0.0), (1.0, 0, 0.7, 0.0),
                                                           (1.2, 10, 0.9, 0.1)])
def test_sample_distribution_chi_square(tk, temperature, top_k, top_p, min_p):
    V, n = 64, 150
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2.5
    p = params(n, temperature, top_k, top_p, min_p, seed=3)
    tokens, _ = tk.s.sample_triton(logits.expand(n, V), *p)
    probs = filter_logits(logits, *(x[:1] for x in p[:4])).softmax(1)[0]
    assert 2 <= (probs > 0).sum() <= 12
    ok, stat, crit = chi_square_ok(tokens, probs)
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"
