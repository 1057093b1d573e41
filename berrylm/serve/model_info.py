"""What the HTTP process of `berry serve` knows of the model it serves, read without torch or weights.

    load_info(MODEL, backend, load_foreign) -> ModelInfo(cfg, tokenizer, name)
The engine process (serve/engine_process.py) loads the weights; the HTTP process needs only the config (context
length, vocabulary) and the tokenizer (chat template, encoding, token bytes for guides), and so does not import
torch (~0.5 GB resident) at all. Anything load_info cannot read this way goes through serve/backend.py's full
loader, whose checks and errors it then gets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from berrylm.model.config import ModelConfig


class ModelInfo:
    """A model's config, tokenizer and name without its weights: what the HTTP process needs when the engine
    process (serve/engine_process.py) runs the model."""

    def __init__(self, cfg: ModelConfig, tokenizer, name: str):
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name


def load_info(model: str | None, backend: str = "torch", load_foreign: Callable | None = None):
    """Like load_backend, but reads only the config and tokenizer where it can (checkpoints, GGUF files, HF dirs):
    the weights are the engine process's to load, and a second copy here would double the server's memory."""
    path = Path(model) if model else None
    if backend != "torch":  # an ONNX export: its runtime is loaded here too (serve/onnx_backend.py)
        from berrylm.serve.backend import load_backend

        return load_backend(model, backend, "cpu", "auto")
    if path is None or not path.exists() or (path.is_dir() and is_berry_dir(path)):
        from berrylm.model.checkpoint_meta import load_config, load_tokenizer, resolve

        return ModelInfo(load_config(model), load_tokenizer(model), resolve(model).name)
    # GGUF files and HF dirs: their header / config.json through the reader the caller passes (export's)
    info = load_foreign(path, weights=False) if load_foreign is not None else None
    if info is not None:
        cfg, tok = info
        return ModelInfo(cfg, tok, path.stem if path.is_file() else path.name)
    # anything else: the full loader's checks and errors
    from berrylm.serve.backend import load_backend

    return load_backend(model, backend, "cpu", "auto", load_foreign=load_foreign)


def is_berry_dir(path: Path) -> bool:
    """A directory whose config.json is a berrylm checkpoint's (not an HF or ONNX export's)."""
    import json

    try:
        return "berrylm_format" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
