"""HF export: stock transformers loads it and matches our model; the HF reader and load_any read it back."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_checkpoint

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]},
        {"role": "tool", "content": "84"}, {"role": "assistant", "content": "84."}]
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                            "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    from berrylm.export.hf import export_hf
    from berrylm.model.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("hf")
    ckpt = make_checkpoint(root / "ck", tokenizer, "berry-1.8m", init_std=0.15)
    model, tok = load_checkpoint(ckpt)
    line = export_hf(model, tok, root / "hf", "f32", ckpt)
    assert "LlamaForCausalLM" in line
    return model, tok, root / "hf"


def test_transformers_matches(exported):
    from berrylm.export.verify import check_transformers

    model, tok, out = exported
    worst, top1, same, n = check_transformers(model, tok, out)
    assert worst <= 1e-4 and top1 == 1.0
    assert same == n == 10


def test_autotokenizer_and_chat_template(exported):
    from transformers import AutoTokenizer

    _, tok, out = exported
    ht = AutoTokenizer.from_pretrained(str(out))
    text = "Héllo wörld — 東京 🍓👍🏽  12345\t\ttabs\n\n  spaces<|im_end|>"
    assert ht.encode(text, add_special_tokens=False) == tok.encode(text)
    assert ht.eos_token == "<|im_end|>" and ht.pad_token == "<|endoftext|>"
    rendered = ht.apply_chat_template(MSGS, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.render_chat(MSGS, TOOLS, add_generation_prompt=True)


def test_reader_and_load_any_round_trip(exported):
    from berrylm.export import load_any

    model, tok, out = exported
    m2, t2 = load_any(out)
    ids = torch.tensor([tok.encode("The cat sat on the mat. 12*7")])
    with torch.no_grad():
        assert (m2(ids) - model(ids)).abs().max().item() <= 1e-6
    assert t2.eos_ids == tok.eos_ids and t2.render_chat(MSGS) == tok.render_chat(MSGS)


def test_serve_loads_an_hf_dir_through_the_reader_the_cli_passes(exported):
    """serve never imports export: `berry serve` (berrylm/cli.py) hands it export's reader."""
    from berrylm.cli import build_parser
    from berrylm.serve.backend import load_backend

    model, tok, out = exported
    args = build_parser().parse_args(["serve", str(out)])
    backend = load_backend(str(out), device="cpu", load_foreign=args.load_foreign)
    ids = torch.tensor([tok.encode("The cat sat on the mat. 12*7")])
    with torch.no_grad():
        assert (backend.model(ids) - model(ids)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="not a berrylm checkpoint"):
        load_backend(str(out), device="cpu")


def test_hybrid_writes_berry_checkpoint_with_note(tmp_path, tokenizer):
    from berrylm.export.hf import export_hf
    from berrylm.model.checkpoint import load_checkpoint

    ckpt = make_checkpoint(tmp_path / "hy", tokenizer, "strawberry-1.8m")
    model, tok = load_checkpoint(ckpt)
    line = export_hf(model, tok, tmp_path / "out", "f32", ckpt)
    assert "hybrid" in line and "cannot" in line and "\n" not in line
    assert "cannot run it" in (tmp_path / "out" / "README.md").read_text()
    m2, _ = load_checkpoint(tmp_path / "out")  # our own format, loadable by berry serve
    assert not m2.cfg.is_llama


def test_bad_hf_dirs_refused_with_one_line(tmp_path, exported):
    import json
    import shutil

    from berrylm.export import load_any

    _, _, out = exported
    bad = tmp_path / "gpt2"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'") as e:
        load_any(bad)
    assert "\n" not in str(e.value)
    trunc = tmp_path / "trunc"
    shutil.copytree(out, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable safetensors") as e:
        load_any(trunc)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a model"):
        load_any(tmp_path)
