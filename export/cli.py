"""`berry export` (filled in by the export package)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to safetensors (HF), GGUF, Ollama or ONNX")
    p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
