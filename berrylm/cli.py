"""`berry` (and `python -m berrylm`): the one command line. Each stage's package registers its own subcommands
from its cli.py.

    data, train, eval   -> train/cli.py       export -> export/cli.py      serve -> serve/cli.py
    chat, ui            -> ui/cli.py          bench  -> bench/cli.py       info  -> model/cli.py

cli.py modules import nothing heavy at top level, so `berry --help` is instant; each command imports
its implementation when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

CLI_MODULES = [f"berrylm.{stage}.cli" for stage in ("train", "export", "serve", "ui", "bench", "model")]


def load_foreign(path, weights: bool = True, each_block=None):
    """A GGUF file or Hugging Face llama dir -> (Transformer, Tokenizer), by export's readers; weights=False reads
    only (ModelConfig, Tokenizer) from its header / config.json (None when it is neither). each_block(model, i) is
    called as each block of a GGUF file is read (export/gguf_reader.py: load_gguf)."""
    from berrylm.export import load_any, read_config_and_tokenizer

    return load_any(path, each_block) if weights else read_config_and_tokenizer(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berry", description="berrylm: train, export and serve tiny language models over the OpenAI API.")
    # serve reads GGUF files and HF dirs through export's readers without importing export (imports flow
    # kernels <- model <- {train, export, serve} <- ui): this CLI, above both, hands the reader over
    parser.set_defaults(load_foreign=load_foreign)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CLI_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # user-facing failures (bad model file, bad argument) print one line, not a traceback; a model file that
        # cannot be loaded exits with 2, any other failure with 1
        from berrylm.model.config import ModelFileError

        print(f"berry {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2 if isinstance(e, ModelFileError) else 1



def run() -> None:
    """The console script and `python -m berrylm`: main(), then exit with its code."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run has finished (process group destroyed, checkpoint and report written) leaves
        # without the interpreter's teardown: there, torch's gloo backend can abort the process now and then
        # ("terminate called without an active exception", no Python frame), failing a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
