"""`berry bench` (filled in by the benchmarks)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (train, serve, kernels) and print its table")
    p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
