"""The Triton kernels against the PyTorch references: compiled on a CUDA GPU when there is one, and on CPU
under the Triton interpreter everywhere.

`triton.jit` (and triton.language itself) pick interpreter or compiler when they are defined, so the
interpreter must be on before triton is first imported. When this process was not started with
TRITON_INTERPRET=1 (the usual whole-suite run, where anything may have imported triton already), the
kernel tests here run compiled on CUDA if a GPU is present, and `test_all_under_interpreter` runs this file in a
fresh pytest subprocess with TRITON_INTERPRET=1 and BERRY_FORCE_TRITON=1 (so the dispatch functions pick the
kernels on CPU). The interpreter is slow per program, so shapes and draw counts are small there; on CUDA they
are real-size (tests named test_cuda_* run only there: they need a GPU, which CPU CI cannot have).

Tolerances: the interpreter computes every tl.dot in plain fp32, so it matches the reference to fp32 rounding.
On a GPU the forward's dots run on tensor cores: "tf32" for half inputs (2^-11 relative rounding of phi(q),
phi(k)), "tf32x3" for fp32 inputs (fp32-level), so state errors are compared as ||a - b|| / ||b||.
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
CUDA = not INTERPRETED and torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parent.parent


def needs_gpu(test):
    """GPU-only: marked `gpu` (CI allows its skip; the interpreter run leaves it out), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton); none here")(test))


def test_all_under_interpreter():
    """Every kernel test but the GPU-only ones, in a TRITON_INTERPRET=1 subprocess, must pass: none may skip (CI=true
    there turns a skip into a failure) and the count that passed is the count collected. (tests/conftest.py
    deselects this wrapper where the kernel tests run in this process: on CUDA, or already interpreted.)"""
    import triton  # noqa: F401  (the test extra installs it; missing, this fails rather than skips)

    env = {**os.environ, "TRITON_INTERPRET": "1", "BERRY_FORCE_TRITON": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    listed = subprocess.run([*cmd, "--collect-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    n_collected = len([ln for ln in listed.stdout.splitlines() if "::" in ln])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{n_collected} passed\b", summary) and "skipped" not in summary, summary
    assert n_collected >= 20, listed.stdout[-2000:]  # the kernel tests really ran


@pytest.fixture(scope="module")
def tk():
    if not (INTERPRETED or CUDA):
        pytest.skip("runs in a subprocess under TRITON_INTERPRET=1 (test_all_under_interpreter)")
    with pytest.MonkeyPatch.context() as mp:
        if INTERPRETED:
            mp.setenv("BERRY_FORCE_TRITON", "1")
        from berrylm.kernels import triton_linear_attention, triton_sampling
        yield SimpleNamespace(la=triton_linear_attention, s=triton_sampling)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def close(got: torch.Tensor, ref: torch.Tensor, in_dtype: torch.dtype, what: str = "o") -> None:
    """Kernel vs reference: exact fp32 rounding under the interpreter; on CUDA the tensor-core precision above."""
    if not CUDA:
        tol = dict(rtol=1e-5, atol=1e-5 if what == "o" else 1e-4)
        if in_dtype != torch.float32 and what == "o":
            tol = dict(rtol=1e-2, atol=1e-2)  # one half-precision ulp
        torch.testing.assert_close(got, ref, **tol)
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    bound = 2e-5 if in_dtype == torch.float32 else 4e-3
    if in_dtype != torch.float32 and what == "o":
        bound = 1e-2  # the output itself is rounded to bf16/fp16
    assert rel_err(got, ref) < bound, f"{what}: relative error {rel_err(got, ref):.2e} >= {bound:.0e}"


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
    close(o, o2, q.dtype)
    close(S, S2, q.dtype, "S")
    close(z, z2, q.dtype, "z")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_inputs(tk, dtype):
    B, T, H, D = 2, 70, 2, 32
    q, k, v = (rand(B, T, H, D, seed=s, dtype=dtype) for s in (1, 2, 3))
    gate = rand(B, T, H, seed=4, dtype=dtype)
    o, (S, z) = tk.la.linear_attention_triton(q, k, v, gate)
    o2, (S2, z2) = linear_attention_ref(q, k, v, gate)
    assert o.dtype == dtype
    close(o.float(), o2.float(), dtype)
    close(S, S2, dtype, "S")
    close(z, z2, dtype, "z")


def test_state_carried_across_calls_and_strided_heads(tk):
    B, T, H, D = 2, 71, 4, 16
    qkv = rand(B, T, 3 * H, D, seed=7)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]  # non-contiguous head slices, as in the model
    gate = rand(B, T, 2 * H, seed=8)[:, :, H:]
    o_all, (S_all, z_all) = linear_attention_ref(q, k, v, gate)
    o1, st = tk.la.linear_attention_triton(q[:, :33], k[:, :33], v[:, :33], gate[:, :33])
    o2, (S, z) = tk.la.linear_attention_triton(q[:, 33:], k[:, 33:], v[:, 33:], gate[:, 33:], st)
    close(torch.cat([o1, o2], 1), o_all, q.dtype)
    close(S, S_all, q.dtype, "S")
    close(z, z_all, q.dtype, "z")


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
    for g, g_ref in zip(*grads):  # the backward is the reference's own: equal up to the forward's rounding
        close(g, g_ref, torch.float32, "grad")


@pytest.mark.parametrize("D,gated", [(32, True), (24, False)])
def test_decode_step_matches_reference_with_slot_scatter(tk, D, gated):
    B, H, N = 3, 2, 6
    q, k, v = (rand(B, H, D, seed=s) for s in (1, 2, 3))
    gate = rand(B, H, seed=4) if gated else None
    S, z = rand(N, H, D, D, seed=5).abs(), rand(N, H, D, seed=6).abs()
    S_ref, z_ref = S.clone(), z.clone()
    slots = torch.tensor([4, 0, 2], device=DEV)
    o = tk.la.linear_attention_step_triton(q, k, v, gate, S, z, slots)
    o_ref = linear_attention_step_ref(q, k, v, gate, S_ref, z_ref, slots)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)  # no dots: plain fp32 everywhere
    torch.testing.assert_close(S, S_ref, rtol=1e-6, atol=1e-6)  # the other slots untouched in both
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)


def test_forward_falls_back_when_no_config_fits(tk, monkeypatch):
    """A GPU whose shared memory fits no launch config (Triton's OutOfResources at launch) gets the next config,
    and when none fits, the reference: never an exception to the caller."""
    class OutOfResources(Exception):  # matched by name, as Triton's own
        pass

    real = tk.la._la_fwd_kernel
    tried = []

    class Kernel:  # fails every config but the last candidate
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append(kw["BLOCK_DV"])
                if len(tried) < limit:
                    raise OutOfResources("shared memory")
                return real[grid](*args, **kw)
            return launch

    D = 32
    cands = [(32, 64, 4, 1, "ieee"), (16, 64, 4, 1, "ieee")]
    monkeypatch.setattr(tk.la, "_la_fwd_kernel", Kernel())
    monkeypatch.setattr(tk.la, "_fwd_candidates", lambda *a: cands)
    monkeypatch.setattr(tk.la, "_FWD_CONFIGS", {})
    q, k, v = rand(1, 40, 2, D, seed=1), rand(1, 40, 2, D, seed=2), rand(1, 40, 2, D, seed=3)
    o_ref, (S_ref, _) = linear_attention_ref(q, k, v)
    limit = 2  # the first config fails, the second launches
    o, (S, _) = tk.la.linear_attention_triton(q, k, v)
    assert tried == [32, 16] and list(tk.la._FWD_CONFIGS.values()) == [cands[1]]
    close(o, o_ref, q.dtype)
    close(S, S_ref, q.dtype, "S")
    tried.clear()
    o, _ = tk.la.linear_attention_triton(q, k, v)  # remembered: straight to the config that fits
    assert tried == [16]
    monkeypatch.setattr(tk.la, "_FWD_CONFIGS", {})
    tried.clear()
    limit = 99  # nothing fits: the reference answers, and the verdict is remembered
    o, (S, _) = tk.la.linear_attention_triton(q, k, v)
    assert tried == [32, 16] and list(tk.la._FWD_CONFIGS.values()) == [None]
    torch.testing.assert_close(o, o_ref)
    o, _ = tk.la.linear_attention_triton(q, k, v)
    assert tried == [32, 16]


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
    model = model.to(DEV)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 32, device=DEV)
        logits = model(tokens[:, :20], cache=cache)
        step = model(tokens[:, 20:], cache=cache)
        full = model(tokens)
    assert calls["prefill"] > 0 and calls["step"] > 0
    monkeypatch.setenv("BERRY_FORCE_TRITON", "0")  # the reference path, for comparison
    with torch.no_grad():
        full_ref = model(tokens)
    monkeypatch.setenv("BERRY_FORCE_TRITON", "1" if INTERPRETED else "")
    tol = dict(rtol=1e-4, atol=1e-4) if not CUDA else dict(rtol=1e-3, atol=1e-3)  # fp32 model: tf32x3 on CUDA
    torch.testing.assert_close(full, full_ref, **tol)
    torch.testing.assert_close(logits, full_ref[:, :20], **tol)
    torch.testing.assert_close(step[:, 0], full_ref[:, 20], **tol)


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
    return tuple(x.to(DEV) for x in (logits, temp, top_k, top_p, min_p, seed))


def near_boundary(logits, temp, top_k, top_p, min_p, tol=1e-5):
    """[B, V] bool: tokens whose keep/drop decision sits within `tol` of a top_p or min_p threshold (mass
    before the token vs top_p, p / p_max vs min_p), where fp32 sums in another order may decide otherwise."""
    t = torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(1)
    x = logits.double() / t
    sx, order = x.sort(1, descending=True)
    p = sx.softmax(1)
    before = torch.zeros_like(p).scatter(1, order, p.cumsum(1) - p)
    ratio = (x - x.max(1, keepdim=True).values).exp()
    return ((before - top_p.double().unsqueeze(1)).abs() < tol) | ((ratio - min_p.double().unsqueeze(1)).abs() < tol)


def check_masks(tk, logits, temp, top_k, top_p, min_p) -> int:
    """The kernel's kept-token mask equals filter_logits' except at fp32 near-boundaries (exact under the
    interpreter). Returns how many tokens differ."""
    mask = tk.s.filter_mask_triton(logits, temp, top_k, top_p, min_p) & torch.isfinite(logits)
    ref = torch.isfinite(filter_logits(logits, temp, top_k, top_p, min_p))
    diff = mask != ref
    if not CUDA:
        assert not diff.any(), diff.sum(1)
    else:
        assert not (diff & ~near_boundary(logits, temp, top_k, top_p, min_p)).any(), diff.sum(1)
    return int(diff.sum())


def check_tokens(tok, tok_ref, logits, temp, top_k, top_p, min_p, seed, step) -> int:
    """Tokens equal sample_ref's except, on CUDA, where the reference's best two Gumbel scores are within a few
    ulps (the GPU's exp/log are approximations). Returns how many rows differ."""
    diff = tok != tok_ref
    if not CUDA:
        assert not diff.any(), diff.nonzero()
        return 0
    from berrylm.kernels.sampling import uniform_noise

    x = filter_logits(logits, temp, top_k, top_p, min_p)
    score = x + -torch.log(-torch.log(uniform_noise(seed, step, x.shape[1])))
    top2 = score.topk(2, dim=1).values
    near = (top2[:, 0] - top2[:, 1]).abs() <= 1e-5 * top2[:, 0].abs().clamp_min(1.0)
    bound = near_boundary(logits, temp, top_k, top_p, min_p).gather(1, tok.unsqueeze(1)).squeeze(1)
    assert not (diff & ~near & ~bound).any(), diff.nonzero()
    return int(diff.sum())


def test_masks_match_filter_logits(tk):
    logits, temp, top_k, top_p, min_p, _ = mixed_rows(12, 500, seed=1)
    check_masks(tk, logits, temp, top_k, top_p, min_p)
    mask = tk.s.filter_mask_triton(logits, temp, top_k, top_p, min_p)
    assert (mask.sum(1) < 500).sum() >= 9  # the filters really cut


@pytest.mark.parametrize("V", [4096, 49152])
def test_masks_at_real_vocabularies(tk, V):
    """At SmolLM2's 49,152 tokens an fp32 cumsum rounds past 1: top_p = 1 must still keep every token."""
    B = 4
    logits = rand(B, V, seed=V) * 3
    one = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt, device=DEV)  # noqa: E731
    keep_all = tk.s.filter_mask_triton(logits, one(1.0), one(0, torch.int64), one(1.0), one(0.0))
    assert keep_all.all()
    assert torch.isfinite(filter_logits(logits, one(1.0), one(0, torch.int64), one(1.0), one(0.0))).all()
    temp, top_p = torch.tensor([1.0, 0.7, 1.3, 1.0], device=DEV), torch.tensor([0.9, 0.95, 0.5, 1.0], device=DEV)
    top_k, min_p = torch.tensor([0, 100, 0, 40], device=DEV), torch.tensor([0.0, 0.0, 0.01, 0.0], device=DEV)
    check_masks(tk, logits, temp, top_k, top_p, min_p)


def test_tokens_identical_to_reference(tk):
    logits, temp, top_k, top_p, min_p, seed = mixed_rows(12, 1000, seed=2)
    for s in range(3):
        step = torch.arange(12, device=DEV) + 100 * s
        tok, lp = tk.s.sample_triton(logits, temp, top_k, top_p, min_p, seed, step)
        tok_ref, lp_ref = sample_ref(logits, temp, top_k, top_p, min_p, seed, step)
        check_tokens(tok, tok_ref, logits, temp, top_k, top_p, min_p, seed, step)
        same = tok == tok_ref
        torch.testing.assert_close(lp[same], lp_ref[same], rtol=1e-5, atol=1e-5)
    greedy = temp == 0
    assert torch.equal(tok[greedy], logits[greedy].argmax(1))


def test_sample_dispatch_forced_and_half_logits(tk):
    logits, temp, top_k, top_p, min_p, seed = mixed_rows(4, 300, seed=3)
    logits = logits.bfloat16()
    step = torch.arange(4, device=DEV)
    tok, lp = sample(logits, temp, top_k, top_p, min_p, seed, step)  # the kernel: forced, or on CUDA
    tok_ref, lp_ref = sample_ref(logits, temp, top_k, top_p, min_p, seed, step)
    check_tokens(tok, tok_ref, logits.float(), temp, top_k, top_p, min_p, seed, step)
    same = tok == tok_ref
    torch.testing.assert_close(lp[same], lp_ref[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.8, 6, 1.0, 0.0), (1.0, 0, 0.7, 0.0),
                                                           (1.2, 10, 0.9, 0.1)])
def test_sample_distribution_chi_square(tk, temperature, top_k, top_p, min_p):
    V, n = 64, 150 if not CUDA else 50000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5)).to(DEV) * 2.5
    p = [x.to(DEV) for x in params(n, temperature, top_k, top_p, min_p, seed=3)]
    tokens, _ = tk.s.sample_triton(logits.expand(n, V), *p)
    probs = filter_logits(logits, *(x[:1] for x in p[:4])).softmax(1)[0]
    assert 2 <= (probs > 0).sum() <= 12
    ok, stat, crit = chi_square_ok(tokens.cpu(), probs.cpu())
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (200, 1.0)])
def test_sample_distribution_at_49k_vocabulary(tk, top_k, top_p):
    """Many seeded draws from one 49,152-token row (SmolLM2's vocabulary): kernel and reference both follow
    the filtered distribution (a chi-square test; bins with < 5 expected draws are merged)."""
    V, n = 49152, 100 if not CUDA else 40000
    logits = rand(1, V, seed=9) * 4
    p = [x.to(DEV) for x in params(n, 1.0, top_k, top_p, 0.0, seed=21)]
    probs = filter_logits(logits, *(x[:1] for x in p[:4])).softmax(1)[0].cpu()
    for fn in (tk.s.sample_triton, sample_ref):
        tokens, _ = fn(logits.expand(n, V), *p)
        ok, stat, crit = chi_square_ok(tokens.cpu(), probs)
        assert ok, f"{fn.__name__}: chi2 {stat:.1f} >= {crit:.1f}"


# ---------------------------------------------------------------- real-size shapes, compiled (GPU only)

@needs_gpu
@pytest.mark.parametrize("D", [16, 24, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H", [(2, 3), (16, 8)])  # few (sequence, head) pairs split value columns; many do not
def test_cuda_prefill_shapes(tk, D, dtype, B, H):
    T = 333  # ragged: not a multiple of the chunk
    q, k, v = (rand(B, T, H, D, seed=s, dtype=dtype) for s in (1, 2, 3))
    gate = rand(B, T, H, seed=4, dtype=dtype)
    state = (rand(B, H, D, D, seed=5).abs(), rand(B, H, D, seed=6).abs())
    o, (S, z) = tk.la.linear_attention_triton(q, k, v, gate, state)
    o2, (S2, z2) = linear_attention_ref(q, k, v, gate, state)
    close(o.float(), o2.float(), dtype)
    close(S, S2, dtype, "S")
    close(z, z2, dtype, "z")


@needs_gpu
@pytest.mark.parametrize("D", [32, 64, 128])
def test_cuda_decode_step_large_batch(tk, D):
    B, H, N = 256, 4, 512
    q, k, v = (rand(B, H, D, seed=s, dtype=torch.bfloat16) for s in (1, 2, 3))
    gate = rand(B, H, seed=4, dtype=torch.bfloat16)
    S, z = rand(N, H, D, D, seed=5).abs(), rand(N, H, D, seed=6).abs()
    S_ref, z_ref = S.clone(), z.clone()
    slots = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:B].to(DEV)
    o = tk.la.linear_attention_step_triton(q, k, v, gate, S, z, slots)
    o_ref = linear_attention_step_ref(q, k, v, gate, S_ref, z_ref, slots)
    close(o.float(), o_ref.float(), torch.bfloat16)
    torch.testing.assert_close(S, S_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-5)


@needs_gpu
def test_cuda_sampler_parity_at_256_by_152k(tk):
    """B = 256 rows over a 152,064-token vocabulary (Qwen-size), mixed parameters: masks and tokens equal the
    reference's except at fp32 near-ties (counted and printed)."""
    B, V = 256, 152064
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(B, V, generator=g) * torch.rand(B, 1, generator=g) * 6).to(DEV)
    pick = lambda *xs: torch.tensor(xs)[torch.arange(B) % len(xs)].to(DEV)  # noqa: E731
    temp = pick(0.0, 1.0, 0.7, 1.3, 1.0, 0.9)
    top_k = pick(0, 0, 50, 0, 1000, 20)
    top_p = pick(1.0, 1.0, 0.9, 0.5, 0.95, 1.0)
    min_p = pick(0.0, 0.05, 0.0, 0.0, 0.0, 0.1)
    seed, step = torch.arange(B, device=DEV) * 7919, torch.arange(B, device=DEV)
    n_mask = check_masks(tk, logits, temp, top_k, top_p, min_p)
    tok, lp = tk.s.sample_triton(logits, temp, top_k, top_p, min_p, seed, step)
    tok_ref, lp_ref = sample_ref(logits, temp, top_k, top_p, min_p, seed, step)
    n_tok = check_tokens(tok, tok_ref, logits, temp, top_k, top_p, min_p, seed, step)
    print(f"sampler parity B={B} V={V}: {n_mask} mask tokens and {n_tok} drawn tokens differ (near-ties)")
    assert n_tok <= 2


@needs_gpu
def test_cuda_offsets_past_int32(tk):
    """Sequences whose batch stride passes 2^31 elements (q, k, v as head slices of one fused buffer of ~8.6 GB):
    the second sequence must read its own rows, not wrapped int32 addresses. Last in this file: a wrong address
    could poison the CUDA context."""
    H, D, T = 4, 64, 200
    Tb = 2 ** 31 // (3 * H * D) + 8  # buffer rows per sequence: stride(0) = Tb * 3H * D > 2^31
    buf = torch.empty(2, Tb, 3 * H, D, device=DEV, dtype=torch.bfloat16)
    assert buf.stride(0) > 2 ** 31
    buf[:, :T].normal_(generator=torch.Generator(DEV).manual_seed(0))
    q, k, v = buf[:, :T, :H], buf[:, :T, H:2 * H], buf[:, :T, 2 * H:]
    o, (S, z) = tk.la.linear_attention_triton(q, k, v)
    o2, (S2, z2) = linear_attention_ref(q[1:].contiguous(), k[1:].contiguous(), v[1:].contiguous())
    close(o[1:].float(), o2.float(), torch.bfloat16)
    close(S[1:], S2, torch.bfloat16, "S")
    del buf
    torch.cuda.empty_cache()
