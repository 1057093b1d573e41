"""`berry bench NAME [ARGS...]`: run one of the benchmark scripts in bench/ and print its table.

Each benchmark is a module `bench/NAME.py` with `main(argv) -> int`; the arguments after NAME go to it
unchanged (`berry bench serve --help` shows them).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in {"__init__", "cli"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(BENCHMARKS) + ") and print its table")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"berrylm.bench.{args.name}").main(args.args)
