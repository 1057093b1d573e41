"""Training throughput per preset on this machine: tokens/s of full optimizer steps (and MFU on CUDA).

    python -m berrylm.bench.train [--presets berry-1.8m,strawberry-1.8m] [--seq-len 256] [--micro-batch 16]
                          [--steps 10] [--optimizer adamw|muon] [--compile] [--threads N]
    berry bench train ...

Each step is what the trainer does per micro-batch: forward (bf16 autocast on CUDA, fp32 on CPU),
cross-entropy (+ the mini-expert balance loss for the hybrid), backward, clip, optimizer step, on random
token ids. The first --warmup steps (allocation, compilation) are not timed.

Peer (llama presets, when transformers is installed; --no-peer skips it): Hugging Face `LlamaForCausalLM` of the
same shape (dims, heads, GQA, tied embeddings, RoPE theta; its default sdpa attention), the same batch, loss, clip
and torch AdamW (lr 1e-3, weight decay 0.1), timed the same way in the same run; the table prints its tokens/s and
ours / its.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from berrylm.model.config import PRESETS, get_preset
from berrylm.model.transformer import Transformer
from berrylm.train.optim import build_optimizers
from berrylm.train.trainer import model_flops_utilization


def bench_preset(name: str, seq_len: int, micro_batch: int, steps: int, warmup: int, optimizer: str,
                 compile: bool, device: torch.device) -> dict:
    cfg = get_preset(name, max_seq_len=max(seq_len, get_preset(name).max_seq_len))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    fwd = torch.compile(model) if compile else model
    opts = build_optimizers(model, optimizer, 1e-3, 0.1)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)  # [B, T+1]
    inp, tgt = x[:, :-1], x[:, 1:]

    def step() -> float:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = fwd(inp)  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
            if cfg.n_experts:
                loss = loss + model.aux_loss * cfg.aux_loss_coef
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()  # float() syncs with the device every step, as the trainer's logging does
    dt = time.perf_counter() - t0
    tps = steps * micro_batch * seq_len / dt
    return {"preset": name, "arch": cfg.arch, "params_m": model.num_params() / 1e6, "tok_per_s": tps,
            "ms_per_step": 1000 * dt / steps, "loss": loss,
            "mfu": model_flops_utilization(model, tps, seq_len, device)}


def hf_llama(cfg):
    """transformers' LlamaForCausalLM with cfg's shape (None when transformers is missing or cfg is not llama)."""
    if not cfg.is_llama:
        return None
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                     mlp_bias=False, initializer_range=cfg.init_std)
    return LlamaForCausalLM(hf)


def bench_peer(name: str, seq_len: int, micro_batch: int, steps: int, warmup: int, device: torch.device) -> dict | None:
    cfg = get_preset(name, max_seq_len=max(seq_len, get_preset(name).max_seq_len))
    torch.manual_seed(0)
    model = hf_llama(cfg)
    if model is None:
        return None
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step() -> float:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=inp, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"tok_per_s": steps * micro_batch * seq_len / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m berrylm.bench.train", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma list (default: all)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face LlamaForCausalLM peer")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)} (known: {', '.join(PRESETS)})")
    if args.steps < 1 or args.seq_len < 1 or args.micro_batch < 1:
        raise ValueError("--steps, --seq-len and --micro-batch must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"training throughput: {where}; batch {args.micro_batch} x {args.seq_len} tokens, {args.optimizer}"
          + (", compiled" if args.compile else ""))
    print(f"{'preset':<18}{'arch':<12}{'params':>9}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}{'HF tok/s':>11}"
          f"{'ratio':>8}")
    for name in names:
        r = bench_preset(name, args.seq_len, args.micro_batch, args.steps, args.warmup, args.optimizer,
                         args.compile, device)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peer = None if args.no_peer else bench_peer(name, args.seq_len, args.micro_batch, args.steps, args.warmup,
                                                    device)
        hf = f"{peer['tok_per_s']:>11,.0f}{r['tok_per_s'] / peer['tok_per_s']:>7.2f}x" if peer else f"{'-':>11}{'-':>8}"
        print(f"{r['preset']:<18}{r['arch']:<12}{r['params_m']:>8.2f}M{r['tok_per_s']:>12,.0f}"
              f"{r['ms_per_step']:>10.1f}{mfu:>8}{hf}", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
