"""A checkpoint's place, config and tokenizer, read without torch (model/checkpoint.py re-exports all of it).

What a process that serves no weights needs -- the HTTP process of `berry serve`, `berry info` -- without the ~0.5 GB
that importing torch costs: resolve a directory or an embedded model's name, read and validate config.json, load
tokenizer.json and generation_config.json. Errors are one CheckpointError line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from berrylm.model.config import ModelConfig, ModelFileError
from berrylm.model.tokenizer import Tokenizer

FORMAT_VERSION = 1
EMBEDDED_DIR = Path(__file__).parent / "embedded"
DEFAULT_MODEL = "berry-chat"


class CheckpointError(ModelFileError):
    """A checkpoint that cannot be loaded; the message is one line naming the file and the problem."""


def embedded_models() -> list[str]:
    if not EMBEDDED_DIR.exists():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").exists())


def resolve(name_or_path: str | Path | None) -> Path:
    """A checkpoint directory, or the name of an embedded model ('berry-chat' when None)."""
    name_or_path = name_or_path or DEFAULT_MODEL
    p = Path(name_or_path)
    if p.exists():
        return p
    if (EMBEDDED_DIR / str(name_or_path)).is_dir():
        return EMBEDDED_DIR / str(name_or_path)
    known = ", ".join(embedded_models()) or "none"
    raise CheckpointError(f"{name_or_path}: no such file or directory, and not an embedded model (embedded: {known})")


def _member(path: Path, name: str, why: str = "") -> Path:
    """path/name, or a one-line CheckpointError when the checkpoint lacks it."""
    f = path / name
    if not f.exists():
        raise CheckpointError(f"{f}: missing{why}")
    return f


def load_config(path: str | Path) -> ModelConfig:
    f = _member(resolve(path), "config.json", " (not a berrylm checkpoint directory)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "berrylm_format" not in d:
        raise CheckpointError(f"{f}: not a berrylm config (no 'berrylm_format' key)")
    if d.pop("berrylm_format") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: unsupported berrylm_format (this version reads {FORMAT_VERSION})")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = resolve(path)
    f = _member(path, "tokenizer.json")
    try:
        return Tokenizer.load(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise CheckpointError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def load_generation_config(path: str | Path) -> dict:
    f = resolve(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
