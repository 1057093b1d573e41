"""The models that ship inside the repo: each is small (fp16 safetensors, a few MB), is the architecture its preset
names, carries a report.md with its measured figures, answers an arithmetic question by calling the real
calculator with a well-formed call, and greets a new user in its own voice. (How often the answer is right is a
figure in the report, from `berry eval`.)"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from berrylm.model.checkpoint import EMBEDDED_DIR, embedded_models, load_checkpoint
from berrylm.model.config import PRESETS
from berrylm.train.eval import run_calculator
from berrylm.train.generate import chat_with_tools

SHIPPED = {"berry-chat": "berry-1.8m", "strawberry-1.8m-chat": "strawberry-1.8m"}


def test_both_embedded_models_ship():
    assert set(SHIPPED) <= set(embedded_models())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_embedded_model_is_small_fp16_and_its_preset(name):
    d = EMBEDDED_DIR / name
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 8 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    cfg = json.loads((d / "config.json").read_text())
    preset = PRESETS[SHIPPED[name]]
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "n_linear_heads", "head_gate", "n_experts"):
        assert cfg[key] == getattr(preset, key), key
    report = (d / "report.md").read_text()
    assert "bpb" in report and "tool" in report.lower() and "berry " in report  # figures + the commands


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_embedded_model_calls_the_calculator(name):
    model, tok = load_checkpoint(name)
    out = chat_with_tools(model, tok, [{"role": "user", "content": "What is 12 * 7?"}], run_calculator, max_new=60)
    assert out["tool_calls"], out["raw"]
    tool, args, result = out["tool_calls"][0]
    assert tool == "calculator" and set(json.loads(args)) == {"expression"}
    assert not result.startswith("error"), result


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_embedded_model_says_what_it_is(name):
    """A new user's first messages (train/data/persona.py): a greeting and "what can you do?" get answers in the
    assistant's own voice, with no calculator call."""
    model, tok = load_checkpoint(name)
    hello = chat_with_tools(model, tok, [{"role": "user", "content": "hi"}], run_calculator, max_new=60)
    skills = chat_with_tools(model, tok, [{"role": "user", "content": "What can you do?"}], run_calculator, max_new=60)
    assert not hello["tool_calls"] and not skills["tool_calls"]
    assert hello["content"].startswith(("Hi", "Hello")) and "Berry" in hello["content"], hello["raw"]
    assert "calculator" in skills["content"], skills["raw"]
