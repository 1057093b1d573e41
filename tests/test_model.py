"""The shared model core: presets, incremental decode == full forward, causality, tying, trainability."""

from __future__ import annotations

import json

import pytest
import torch

from berrylm.model.cache import KVCache
from berrylm.model.config import PRESETS, ModelConfig, get_preset
from berrylm.model.transformer import Transformer

ARCHS = ["berry-1.8m", "strawberry-1.8m"]


def tiny(preset: str, **kw) -> ModelConfig:
    base = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, head_dim=16, ffn_dim=96, max_seq_len=256)
    if get_preset(preset).n_experts:
        base.update(n_kv_heads=1, n_linear_heads=2, expert_dim=32, ffn_dim=0)
    else:
        base.update(n_kv_heads=2)
    base.update(kw)
    return get_preset(preset, **base)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_match_names(name):
    cfg = PRESETS[name]
    target = float(name.split("-")[1].rstrip("m")) * 1e6
    assert abs(cfg.num_params() - target) / target <= 0.05, (name, cfg.num_params())
    if cfg.n_layers * cfg.dim <= 160 * 5:  # build the small ones for real and count
        assert Transformer(cfg).num_params() == cfg.num_params()


def test_presets_have_the_right_architecture():
    assert all(PRESETS[n].is_llama for n in ("berry-1.8m", "berry-8m", "berry-26m"))
    s = PRESETS["strawberry-1.8m"]
    assert not s.is_llama and 0 < s.n_linear_heads < s.n_heads and s.head_gate and s.n_experts > s.experts_top_k
    b = PRESETS["berry-26m"]
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads) == (512, 8, 8, 2) and 6000 <= b.vocab_size <= 6500


def test_config_json_round_trip(tmp_path):
    cfg = PRESETS["strawberry-1.8m"]
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefill", [1, 37, 64])
def test_incremental_decode_equals_full_forward(arch, prefill):
    torch.manual_seed(0)
    cfg = tiny(arch)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 100))  # T > CHUNK so the chunked path crosses chunks
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, batch=3, max_len=128)
        parts = [model(tokens[:, :prefill], cache=cache)]
        parts += [model(tokens[:, t:t + 1], cache=cache) for t in range(prefill, 100)]
    assert (full - torch.cat(parts, dim=1)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_perturbing_a_token_leaves_the_past_unchanged(arch):
    torch.manual_seed(1)
    cfg = tiny(arch, init_std=0.2)  # a large init makes any leak visible
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 80))
    t = 50
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert (a[:, :t] - b[:, :t]).abs().max().item() == 0.0
    assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-4  # the change does reach the future


def test_a_sequence_mean_gate_would_fail_the_causality_test():
    """Guard the guard: the test above catches a gate computed from the whole-sequence mean."""
    torch.manual_seed(1)
    cfg = tiny("strawberry-1.8m", init_std=0.2)
    model = Transformer(cfg).eval()

    class MeanGate(torch.nn.Module):  # a leaking gate: computed from the mean over the whole sequence
        def __init__(self, wg):
            super().__init__()
            self.wg = wg

        def forward(self, x):
            return self.wg(x.mean(dim=1, keepdim=True)).expand(-1, x.shape[1], -1)

    for block in model.layers:
        block.attn.wg = MeanGate(block.attn.wg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 60))
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % cfg.vocab_size
    with torch.no_grad():
        leak = (model(tokens)[:, :40] - model(changed)[:, :40]).abs().max().item()
    assert leak > 1e-6


def test_weight_tying():
    model = Transformer(tiny("berry-1.8m"))
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = Transformer(tiny("berry-1.8m", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_init_trains_loss_falls_on_tiny_overfit(arch):
    torch.manual_seed(0)
    cfg = tiny(arch)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(60):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + cfg.aux_loss_coef * model.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.3 * losses[0], losses[::10]


def test_experts_aux_loss_is_minimal_when_balanced():
    """Switch-style balance loss E * sum_e f_e * P_e (f: share of routed slots, P: mean router probability): 1 when a
    hand-built router spreads tokens evenly, 2 when every token goes to the same two of four experts; its gradient
    moves the router towards balance; the model's aux_loss is the sum over its layers."""
    from berrylm.model.transformer import MiniExperts

    E, dim = 4, 8
    moe = MiniExperts(dim, 4, E, top_k=2)
    with torch.no_grad():
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.zero_()
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = 20 * torch.eye(E)  # token feature e votes for expert e

    def tokens(pairs):  # one token per expert pair, features set on the pair's two experts
        x = torch.zeros(1, len(pairs), dim)
        for t, (a, b) in enumerate(pairs):
            x[0, t, a] = x[0, t, b] = 1.0
        return x

    moe(tokens([(0, 1), (2, 3)] * 8))  # every expert gets a quarter of the slots and of the probability
    assert abs(moe.aux_loss.item() - 1.0) < 1e-3
    moe(tokens([(0, 1), (1, 2), (2, 3), (3, 0)] * 4))
    assert abs(moe.aux_loss.item() - 1.0) < 1e-3
    moe(tokens([(0, 1)] * 16))  # experts 2 and 3 idle: f = P = (1/2, 1/2, 0, 0)
    assert abs(moe.aux_loss.item() - 2.0) < 1e-3
    with torch.no_grad():
        moe.router.weight[:, :E] = 2 * torch.eye(E)  # softer, so the loss has a gradient
    x = tokens([(0, 1)] * 12 + [(2, 3)] * 4)
    moe(x)
    before = moe.aux_loss
    before.backward()
    with torch.no_grad():
        moe.router.weight -= 0.5 * moe.router.weight.grad
    moe(x)
    assert 1.0 < moe.aux_loss.item() < before.item()

    cfg = tiny("strawberry-1.8m")
    model = Transformer(cfg)
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    layers = [b.mlp.aux_loss for b in model.layers]
    assert len(layers) == cfg.n_layers and torch.isfinite(model.aux_loss)
    assert model.aux_loss.item() == pytest.approx(sum(x.item() for x in layers))
    assert all(x.item() >= 1.0 - 1e-6 for x in layers)  # E * sum f_e P_e >= 1 (Chebyshev), 1 only at balance
