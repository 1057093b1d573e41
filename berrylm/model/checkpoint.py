"""The checkpoint format: one directory, written atomically, validated on load.

    config.json             ModelConfig fields + "berrylm_format": 1
    model.safetensors       weights (tied lm_head stored once, as tok_emb.weight)
    tokenizer.json          byte-level BPE (tokenizers)
    chat_template.jinja     the chat format, used by training, serving and every export
    generation_config.json  eos ids and default sampling
    train_state/state.pt    optional: optimizer, step, data cursor, RNG (torch.load(weights_only=True))

A save writes a temp directory next to the target, fsyncs every file, then swaps it into place, so a
crash leaves either the old checkpoint or the new one, never half of one; a save that fails with an exception
removes its temp directory (and puts the previous checkpoint back if the swap itself failed). A load refuses a missing,
truncated, foreign or mismatched file with one CheckpointError line naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from berrylm.model.checkpoint_meta import (
    DEFAULT_MODEL,
    EMBEDDED_DIR,
    FORMAT_VERSION,
    CheckpointError,
    _member,
    embedded_models,
    load_config,
    load_generation_config,
    load_tokenizer,
    resolve,
)
from berrylm.model.config import ModelFileError
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer

__all__ = ["DEFAULT_MODEL", "EMBEDDED_DIR", "FORMAT_VERSION", "CheckpointError", "check_safetensors",
           "embedded_models",
           "expected_shapes", "load_checkpoint", "load_config", "load_generation_config", "load_tokenizer",
           "load_train_state", "load_weights", "resolve", "save_checkpoint"]

def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_generation_config(tok: Tokenizer) -> dict:
    return {"eos_token_id": tok.eos_ids, "pad_token_id": tok.endoftext_id, "bos_token_id": None,
            "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer, *,
                    dtype: torch.dtype | None = None, generation_config: dict | None = None,
                    train_state: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a checkpoint directory atomically. `dtype` casts the stored weights (e.g. torch.float16)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if tmp.exists():  # left by a process with our pid that died mid-save
        shutil.rmtree(tmp)
    if old.exists():  # ... or in the swap window, when it may be the only copy of the previous checkpoint
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    tmp.mkdir()
    try:
        _write_all(tmp, model, tokenizer, dtype, generation_config, train_state, extra_files)
        if path.exists():
            os.replace(path, old)  # the only window: `old` holds the previous checkpoint until the next line
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the previous checkpoint back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves no temporary directory behind
        raise
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def _write_all(tmp: Path, model: Transformer, tokenizer: Tokenizer, dtype: torch.dtype | None,
               generation_config: dict | None, train_state: dict | None, extra_files: dict[str, bytes] | None) -> None:
    """Every file of the checkpoint into the (new, empty) directory tmp, each fsynced, then the directory."""
    cfg = model.cfg
    _fsync_write(tmp / "config.json", (json.dumps({**cfg.to_dict(), "berrylm_format": FORMAT_VERSION},
                                                  indent=2) + "\n").encode())
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "berrylm_format": str(FORMAT_VERSION)})
    _fsync_file(tmp / "model.safetensors")
    tokenizer.save(tmp)
    _fsync_file(tmp / "tokenizer.json")
    _fsync_file(tmp / "chat_template.jinja")
    gen = generation_config or default_generation_config(tokenizer)
    _fsync_write(tmp / "generation_config.json", (json.dumps(gen, indent=2) + "\n").encode())
    for name, data in (extra_files or {}).items():
        _fsync_write(tmp / name, data)
    if train_state is not None:
        (tmp / "train_state").mkdir()
        torch.save(train_state, tmp / "train_state" / "state.pt")
        _fsync_file(tmp / "train_state" / "state.pt")
    _fsync_dir(tmp)


def check_safetensors(files: list[Path], expected: dict[str, tuple], rename=None) -> None:
    """Before anything is allocated: the files' headers name exactly the expected tensors with the expected shapes
    and hold their bytes (safetensors checks its header against the file's size). rename: file key -> ours, or None
    to skip the key."""
    seen: dict[str, tuple] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    ours = rename(k) if rename is not None else k
                    if ours is not None:
                        seen[ours] = tuple(sf.get_slice(k).get_shape())
        except ModelFileError:
            raise
        except Exception as e:  # safetensors raises its own errors on truncated / foreign files
            raise CheckpointError(f"{f}: unreadable safetensors file ({(str(e).splitlines() or [''])[0][:200]})") \
                from None
    where = files[0] if len(files) == 1 else files[0].parent
    missing, unexpected = sorted(set(expected) - set(seen)), sorted(set(seen) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match the config (missing: {missing[:3]}, "
                              f"unexpected: {unexpected[:3]})")
    for k, shape in expected.items():
        if seen[k] != tuple(shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {seen[k]}, the config implies {tuple(shape)}")


def expected_shapes(model: Transformer) -> dict[str, tuple]:
    """Tensor name -> shape of a (meta) model, the tied head left out."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (model.cfg.tie_embeddings and k == "lm_head.weight")}


def load_weights(path: Path, model: Transformer) -> None:
    f = _member(path, "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items()
                if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    try:
        with safe_open(str(f), framework="pt") as sf:
            keys = set(sf.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{f}: tensors do not match config.json "
                                      f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
            loaded = {}
            for k, ref in expected.items():
                t = sf.get_tensor(k)
                if tuple(t.shape) != tuple(ref.shape):
                    raise CheckpointError(f"{f}: tensor {k} has shape {tuple(t.shape)}, config.json implies "
                                          f"{tuple(ref.shape)}")
                if not t.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {k} has dtype {t.dtype}, expected a float type")
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"{f}: tensor {k} contains NaN or inf")
                loaded[k] = t
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own errors on truncated / foreign files
        raise CheckpointError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    model.load_state_dict(loaded, strict=False)


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load (model in eval mode, tokenizer) from a checkpoint directory or an embedded model's name."""
    path = resolve(path)
    cfg = load_config(path)
    tok = load_tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path / 'tokenizer.json'}: {tok.vocab_size} tokens but the model has only "
                              f"{cfg.vocab_size} embedding rows")
    with torch.device("meta"):
        model = Transformer(cfg)
    check_safetensors([_member(path, "model.safetensors")], expected_shapes(model))  # before allocating
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    load_weights(path, model)
    return model.to(device=device, dtype=dtype).eval(), tok


def load_train_state(path: str | Path) -> dict | None:
    f = Path(path) / "train_state" / "state.pt"
    if not f.exists():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable training state ({str(e).splitlines()[0]})") from None
