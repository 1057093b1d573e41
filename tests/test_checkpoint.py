"""Checkpoint format: round trip, atomic writes, and one-line refusals of broken files; `berry info`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import berrylm.model.checkpoint as ckpt
from berrylm.model.checkpoint import (
    CheckpointError,
    default_generation_config,
    load_checkpoint,
    load_generation_config,
    load_train_state,
    save_checkpoint,
)
from tests.conftest import make_checkpoint, make_model

REPO = Path(__file__).resolve().parents[1]


def test_generation_config_round_trip(tmp_path, tokenizer):
    """The sampling defaults a checkpoint carries come back as saved (the default set when none is given), and a
    checkpoint without the file has none."""
    model = make_model(tokenizer)
    given = {"temperature": 0.3, "top_p": 0.5, "max_new_tokens": 12}
    assert load_generation_config(save_checkpoint(tmp_path / "a", model, tokenizer, generation_config=given)) == given
    plain = save_checkpoint(tmp_path / "b", model, tokenizer)
    assert load_generation_config(plain) == default_generation_config(tokenizer)
    (plain / "generation_config.json").unlink()
    assert load_generation_config(plain) == {}


@pytest.mark.parametrize("preset", ["berry-1.8m", "strawberry-1.8m"])
def test_round_trip_gives_identical_logits(tmp_path, tokenizer, preset):
    original = make_model(tokenizer, preset).eval()
    path = save_checkpoint(tmp_path / "c", original, tokenizer)
    model, tok = load_checkpoint(path)
    x = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))  # the saved weights, bit for bit, not a second load of the file
    assert tok.encode("the quick brown fox") == tokenizer.encode("the quick brown fox")
    assert sorted(p.name for p in path.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert model.lm_head.weight is model.tok_emb.weight


def test_half_precision_storage_and_train_state(tmp_path, tokenizer):
    path = make_checkpoint(tmp_path / "src", tokenizer)
    model, tok = load_checkpoint(path)
    state = {"step": 7, "rng": torch.get_rng_state(), "cursor": [1, 2, 3]}
    out = save_checkpoint(tmp_path / "half", model, tok, dtype=torch.float16, train_state=state)
    assert (out / "model.safetensors").stat().st_size < (path / "model.safetensors").stat().st_size * 0.6
    half, _ = load_checkpoint(out)
    x = torch.randint(0, tok.vocab_size, (1, 16))
    ref = model(x)
    assert (half(x) - ref).abs().max().item() < 1e-2 * ref.abs().max().item()  # fp16 weights: ~1e-3 relative
    loaded = load_train_state(out)
    assert loaded["step"] == 7 and torch.equal(loaded["rng"], state["rng"]) and loaded["cursor"] == [1, 2, 3]


@pytest.mark.parametrize("crash_in", ["save_file", "train_state", "swap"])
def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, tokenizer, monkeypatch, crash_in):
    """A save that fails at any step (the weights, the training state, the swap itself) leaves the previous
    checkpoint whole (weights and training state) and no temporary directory behind."""
    model, tok = load_checkpoint(make_checkpoint(tmp_path / "src", tokenizer))
    path = save_checkpoint(tmp_path / "c", model, tok, train_state={"step": 1})
    before = (path / "model.safetensors").read_bytes()
    other = make_model(tokenizer, seed=1)

    def boom(*a, **k):
        raise OSError("disk full")

    if crash_in == "save_file":
        monkeypatch.setattr(ckpt, "save_file", boom)
    elif crash_in == "train_state":
        monkeypatch.setattr(ckpt.torch, "save", boom)
    else:
        real_replace = ckpt.os.replace
        monkeypatch.setattr(ckpt.os, "replace", lambda a, b: boom() if ".tmp-" in Path(a).name else real_replace(a, b))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, other, tok, train_state={"step": 2})
    assert (path / "model.safetensors").read_bytes() == before
    assert load_train_state(path) == {"step": 1}
    load_checkpoint(path)  # still loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]  # no .c.tmp-PID / .c.old-PID left


def corrupt(path: Path, how: str) -> str:
    """Damage a checkpoint; return a phrase the one-line error must contain."""
    st = path / "model.safetensors"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if how == "foreign":
        st.write_bytes(b"GGUF" + bytes(200))
        return "model.safetensors"
    if how == "wrong-shape":
        cfg = json.loads((path / "config.json").read_text())
        cfg["dim"] = cfg["dim"] * 2
        (path / "config.json").write_text(json.dumps(cfg))
        return "shape"
    if how == "missing-weights":
        st.unlink()
        return "missing"
    if how == "bad-json":
        (path / "config.json").write_text("{not json")
        return "config.json"
    if how == "not-berrylm":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return "berrylm"
    if how == "bad-tokenizer":
        (path / "tokenizer.json").write_text("[1, 2")
        return "tokenizer.json"
    if how == "nan":
        from safetensors.torch import load_file, save_file

        t = load_file(str(st))
        t["norm.weight"][0] = float("nan")
        save_file(t, str(st))
        return "NaN"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "foreign", "wrong-shape", "missing-weights", "bad-json",
                                 "not-berrylm", "bad-tokenizer", "nan"])
def test_broken_checkpoints_are_refused_with_one_clear_line(tmp_path, tokenizer, llama_checkpoint, how):
    path = tmp_path / "c"
    shutil.copytree(llama_checkpoint, path)
    phrase = corrupt(path, how)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and phrase in msg, msg
    # the CLI prints the same one line and no traceback
    r = subprocess.run([sys.executable, "-m", "berrylm", "info", str(path)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not an embedded model"):
        load_checkpoint(tmp_path / "nope")


def test_berry_info_prints_config_params_and_files(hybrid_checkpoint):
    r = subprocess.run([sys.executable, "-m", "berrylm", "info", str(hybrid_checkpoint)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    model, _ = load_checkpoint(hybrid_checkpoint)
    assert "architecture strawberry" in r.stdout
    assert f"{model.num_params():,}" in r.stdout
    assert "model.safetensors" in r.stdout and "n_linear_heads" in r.stdout


def test_berry_help_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "berrylm", "--help"], capture_output=True, text=True, cwd=REPO)
    for cmd in ["data", "train", "export", "serve", "chat", "ui", "eval", "bench", "info"]:
        assert f"    {cmd} " in r.stdout, cmd
