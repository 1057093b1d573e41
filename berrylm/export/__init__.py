"""Export (HF safetensors, GGUF, ONNX, Ollama) and import (GGUF, HF llama dirs) of berrylm models."""

from __future__ import annotations

from pathlib import Path


def load_any(path: str | Path, each_block=None):
    """A berrylm checkpoint dir, a Hugging Face llama dir or a .gguf file -> (Transformer, Tokenizer).
    Anything else, or a malformed file, is refused with one ValueError line (a ModelFileError for a malformed file:
    whatever a hostile file makes a reader raise is reported as one). each_block(model, i): see load_gguf (GGUF
    files only; other readers never call it)."""
    from berrylm.model.config import ModelFileError

    try:
        return _load_any(path, each_block)
    except ValueError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, RecursionError, UnicodeError) as e:
        raise ModelFileError(f"{path}: malformed model file ({type(e).__name__}: {str(e)[:200]})") from None


def _load_any(path: str | Path, each_block=None):
    import json

    from berrylm.model.config import ModelFileError

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{p}: not a GGUF file (wrong magic {magic!r}) and not a model directory")
        from berrylm.export.gguf_reader import load_gguf

        return load_gguf(p, each_block=each_block)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{p}: not a model (expected a checkpoint/HF directory with config.json, or a .gguf file)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{cfg_file}: unreadable JSON ({(str(e).splitlines() or [''])[0][:200]})") from None
    if isinstance(cfg, dict) and "berrylm_format" in cfg:
        from berrylm.model.checkpoint import load_checkpoint

        return load_checkpoint(p)
    from berrylm.export.hf_reader import load_hf

    return load_hf(p)


def read_config_and_tokenizer(path: str | Path):
    """(ModelConfig, Tokenizer) of a GGUF file or an HF llama dir without loading its weights; None for anything
    else (the caller then goes through load_any's checks and errors)."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
        from berrylm.export.gguf_reader import GGUFFile, gguf_config, gguf_tokenizer

        g = GGUFFile(p)
        return gguf_config(g, p.stem), gguf_tokenizer(g)
    if (p / "config.json").is_file() and not (p / "model.onnx").is_file():
        import json

        from berrylm.export.hf_reader import hf_to_config, load_hf_tokenizer

        try:
            d = json.loads((p / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(d, dict):
            return hf_to_config(d, p.name), load_hf_tokenizer(p)
    return None
