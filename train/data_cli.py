"""`berry data ...`: corpus building and chat-data generators."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build a pretraining corpus or chat data (shards, dedup, generators)")
    p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
