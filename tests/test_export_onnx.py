"""ONNX export run in onnxruntime: prefill + 16 cached decode steps at batch 2, llama and hybrid."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_checkpoint


@pytest.mark.parametrize("preset", ["berry-1.8m", "strawberry-1.8m"])
def test_onnxruntime_matches_with_cache(tmp_path, tokenizer, preset):
    import onnx

    from berrylm.export.onnx_export import export_onnx, io_names
    from berrylm.export.verify import check_onnx
    from berrylm.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(make_checkpoint(tmp_path / "ck", tokenizer, preset, init_std=0.15))
    export_onnx(model, tok, tmp_path / "onnx")
    worst, top1, same, n = check_onnx(model, tok, tmp_path / "onnx", n_new=16, batch=2)
    assert worst <= 1e-4 and top1 == 1.0 and same == n
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    names_in, names_out = io_names(model.cfg)
    assert [i.name for i in graph.input] == names_in and [o.name for o in graph.output] == names_out
    assert "past_key_values.0.key" in names_in and "present.1.value" in names_out
    if preset.startswith("strawberry"):
        assert "past_linear_state.0.S" in names_in and "present_linear_state.1.z" in names_out
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # batch, sequence
    assert isinstance(dims["past_key_values.0.key"][2], str)  # past length
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["model"]["eos_token_id"] == tok.eos_ids
    assert (tmp_path / "onnx" / "tokenizer.json").exists() and (tmp_path / "onnx" / "tokenizer_config.json").exists()
