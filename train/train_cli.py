"""`berry train tokenizer|pretrain|sft` and `berry eval`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    for name, help_ in [("train", "train a tokenizer, pretrain, or fine-tune on chat data"),
                        ("eval", "evaluate a model: val bits-per-byte, calculator tool-use accuracy")]:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
