"""`berry chat` and `berry ui` (filled in by the chat clients)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    for name, help_ in [("chat", "chat with a model in the terminal"), ("ui", "open the Streamlit chat app")]:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=_pending)


def _pending(args: argparse.Namespace) -> int:
    raise RuntimeError(f"'{args.command}' is not implemented yet")
