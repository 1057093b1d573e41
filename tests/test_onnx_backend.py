"""The onnxruntime backend (serve/onnx_backend.py) against the torch backend on the same tiny checkpoints:
paged logits step by step, engine greedy outputs, and `berry serve EXPORT --backend onnx` over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.conftest import make_checkpoint
from tests.test_server import _start, _stop

PROMPTS = ["Hello there, how", "The quick brown fox jumps over the lazy dog and then", "a",
           "Once upon a time in a land far away there lived a"]


@pytest.fixture(scope="module", params=["berry-1.8m", "strawberry-1.8m"])
def pair(request, tmp_path_factory, tokenizer):
    """(checkpoint dir, ONNX export dir, TorchBackend, OnnxBackend) of one random model."""
    from berrylm.export.onnx_export import export_onnx
    from berrylm.model.checkpoint import load_checkpoint
    from berrylm.serve.backend import TorchBackend
    from berrylm.serve.onnx_backend import OnnxBackend

    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "ckpt", tokenizer, request.param, init_std=0.15)
    model, tok = load_checkpoint(ckpt)
    export_onnx(model, tok, root / "onnx")
    return ckpt, root / "onnx", TorchBackend(model, tok), OnnxBackend(root / "onnx", threads=1)


def test_config_and_tokenizer_from_export(pair):
    _, _, tb, ob = pair
    for f in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_linear_heads", "max_seq_len"):
        assert getattr(ob.cfg, f) == getattr(tb.cfg, f), f
    assert ob.cfg.arch == tb.cfg.arch
    assert ob.tokenizer.encode("Hello <|im_end|> world") == tb.tokenizer.encode("Hello <|im_end|> world")
    assert ob.tokenizer.eos_ids == tb.tokenizer.eos_ids


def test_paged_logits_match_torch(pair):
    """Rows of different cached lengths (padded past), right-padded prefill groups, then batched decode."""
    from berrylm.serve.kv_cache import KVPool, PagedBatch

    _, _, tb, ob = pair
    cfg, bs = tb.cfg, 4
    prompts = [tb.tokenizer.encode(p) for p in PROMPTS]
    pools = [KVPool(cfg, 64, bs, 4, torch.device("cpu"), torch.float32) for _ in range(2)]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(4)]  # 16 blocks = 64 tokens per row
    hybrid = cfg.n_linear_heads > 0
    groups = [[i] for i in range(4)] if hybrid else [[0, 1, 2, 3]]  # hybrids prefill without padding
    worst = 0.0
    for g in groups:
        T = max(len(prompts[i]) for i in g)
        toks = torch.tensor([prompts[i] + [0] * (T - len(prompts[i])) for i in g])
        outs = [be.forward(toks, PagedBatch(pool, [tables[i] for i in g], [0] * len(g), T, g,
                                            [len(prompts[i]) for i in g]))
                for be, pool in zip((tb, ob), pools)]
        for r, i in enumerate(g):
            n = len(prompts[i])
            worst = max(worst, (outs[0][r, :n] - outs[1][r, :n]).abs().max().item())
    lengths = [len(p) for p in prompts]
    last = torch.tensor([[p[-1]] for p in prompts])
    for _ in range(6):  # batched decode, every row at its own position
        outs = [be.forward(last, PagedBatch(pool, tables, lengths, 1, [0, 1, 2, 3]))
                for be, pool in zip((tb, ob), pools)]
        worst = max(worst, (outs[0] - outs[1]).abs().max().item())
        assert torch.equal(outs[0][:, -1].argmax(-1), outs[1][:, -1].argmax(-1))
        last = outs[0][:, -1].argmax(-1, keepdim=True)
        lengths = [n + 1 for n in lengths]
    assert worst < 1e-4, worst
    # the K/V the onnx backend wrote into its pool are the ones the torch backend wrote
    for layer in range(cfg.n_layers if cfg.n_softmax_heads else 0):
        used = torch.tensor([t[j // bs] * bs + j % bs for t, n in zip(tables, lengths) for j in range(n)])
        assert torch.allclose(pools[0].k[layer][used], pools[1].k[layer][used], atol=1e-5)
    if hybrid:
        assert torch.allclose(pools[0].S[0], pools[1].S[0], atol=1e-4)


def test_engine_greedy_matches_torch(pair):
    from berrylm.serve.engine import Engine, EngineConfig
    from berrylm.serve.sampler import SamplingParams

    _, _, tb, ob = pair
    prompts = [tb.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for kw in ({}, {"prefill_chunk": 5}):  # whole and chunked prefill
        cfg = EngineConfig(max_batch=8, block_size=4, num_blocks=128, **kw)
        want = Engine(tb, cfg).generate(prompts, params)
        got = Engine(ob, cfg).generate(prompts, params)
        assert [d.tokens for d in got] == [d.tokens for d in want]
        assert all(len(d.tokens) == 20 for d in got)


def test_load_backend_errors(pair, tmp_path):
    from berrylm.serve.backend import load_backend

    ckpt, onnx_dir, _, _ = pair
    with pytest.raises(ValueError, match="--backend onnx"):
        load_backend(str(onnx_dir), "torch")
    with pytest.raises(ValueError, match="not an ONNX export"):
        load_backend(str(ckpt), "onnx")
    with pytest.raises(ValueError, match="CPU"):
        load_backend(str(onnx_dir), "onnx", dtype="bfloat16")
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        load_backend(str(tmp_path), "onnx")


async def _complete_all(base: str, prompts: list[str]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        rs = await asyncio.gather(*[c.post("/v1/completions", json={
            "model": "tiny", "prompt": p, "max_tokens": 5 + 3 * i, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}) for i, p in enumerate(prompts)])
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json()["choices"][0] for r in rs]


def test_http_onnx_server_equals_torch_server(pair):
    """4 concurrent requests of different lengths (batched decode) against both servers."""
    ckpt, onnx_dir, _, _ = pair
    results = []
    for args in ((ckpt,), (onnx_dir, "--backend", "onnx")):
        proc, base = _start(*args, "--max-model-len", "256")
        try:
            results.append(asyncio.run(_complete_all(base, PROMPTS)))
            results.append(asyncio.run(_complete_all(base, PROMPTS[:1]))[0])  # alone
        finally:
            _stop(proc)
    (torch_all, torch_one), (onnx_all, onnx_one) = results[:2], results[2:]
    for a, b in zip(torch_all, onnx_all):
        assert b["text"] == a["text"] and b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-3)
    assert onnx_one["text"] == torch_one["text"] == torch_all[0]["text"]
