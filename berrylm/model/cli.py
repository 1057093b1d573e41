"""`berry info CKPT`: config, parameter count and files of a checkpoint (or an embedded model)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's config, parameter count and files")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or embedded model name")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from berrylm.model.checkpoint import load_checkpoint, load_generation_config, resolve

    path = resolve(args.model)
    model, tok = load_checkpoint(path)
    cfg = model.cfg
    print(f"checkpoint   {path}")
    print(f"architecture {cfg.arch} (preset name: {cfg.name})")
    print(f"parameters   {model.num_params():,} ({model.num_params() / 1e6:.2f}M)")
    print(f"tokenizer    {tok.vocab_size} tokens (byte-level BPE), chat template {len(tok.chat_template)} chars")
    print("config")
    for k, v in cfg.to_dict().items():
        print(f"  {k:16s} {v}")
    gen = load_generation_config(path)
    if gen:
        print("generation   " + ", ".join(f"{k}={v}" for k, v in gen.items()))
    print("files")
    for f in sorted(path.rglob("*")):
        if f.is_file():
            print(f"  {str(f.relative_to(path)):28s} {f.stat().st_size:>12,} bytes")
    return 0
