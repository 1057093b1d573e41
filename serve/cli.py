"""`berry serve` (filled in by the serving package)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
