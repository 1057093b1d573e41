"""GGUF export checked in llama.cpp itself (llama-cpp-python), and read back by our GGUF importer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_checkpoint

UNICODE = ("Héllo wörld! naïve café — 東京タワー 你好世界 🍓🎉👍🏽  12345 678\t\ttabs   spaces\n\n"
           "new  lines ¿qué? Ünïcödé ﬁ ÅÆØ ñ Ω≈ç√ 𝔘𝔫𝔦 ٱلْعَرَبِيَّة  \n  end")


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory, tokenizer):
    from berrylm.export.gguf_writer import export_gguf
    from berrylm.model.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("gguf")
    model, tok = load_checkpoint(make_checkpoint(root / "ck", tokenizer, "berry-1.8m", init_std=0.15))
    files = {dt: root / f"m-{dt}.gguf" for dt in ("f32", "q8_0", "q4_0")}
    for dt, f in files.items():
        export_gguf(model, tok, f, dt)
    return model, tok, files


def test_llama_cpp_f32_matches(model_and_files):
    from berrylm.export.verify import check_llama_cpp

    model, tok, files = model_and_files
    worst, top1, same, n = check_llama_cpp(model, tok, files["f32"])
    assert worst <= 1e-3 and top1 == 1.0
    assert same == n >= 10


def test_wrong_rope_permutation_would_be_caught(model_and_files, tmp_path, monkeypatch):
    """Without the Q/K row permutation llama.cpp's logits are far off: the check above has teeth."""
    import berrylm.export.gguf_writer as gw
    from berrylm.export.verify import check_llama_cpp

    model, tok, _ = model_and_files
    monkeypatch.setattr(gw, "rope_permute", lambda w, n_heads: w)
    gw.export_gguf(model, tok, tmp_path / "bad.gguf", "f32")
    worst, *_ = check_llama_cpp(model, tok, tmp_path / "bad.gguf", n_new=4)
    assert worst > 1e-2


def test_llama_cpp_tokenizer_ids_identical(model_and_files):
    from llama_cpp import Llama

    _, tok, files = model_and_files
    llm = Llama(str(files["f32"]), n_threads=2, verbose=False, n_ctx=256)
    assert llm.tokenize(UNICODE.encode(), add_bos=False, special=False) == tok.encode(UNICODE)
    chat = tok.render_chat([{"role": "user", "content": "hi 12*7"}], add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)
    assert llm.token_eos() == tok.im_end_id
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template


# Worst rounding error of one weight, as a fraction of its 32-weight block's largest |w|: q8_0 rounds w/d, d = amax/127,
# to the nearest integer (half a step); q4_0 maps [-amax, amax] onto -8..7 with d = amax/8, so the end opposite the
# block's extreme is clipped by one whole step. Both store d as f16 (2^-11 relative, times at most 127 or 8 steps).
ROUNDING = {"q8_0": 1 / 254 + 1 / 2048, "q4_0": 1 / 8 + 1 / 2048}


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_load_and_stay_close(model_and_files, dtype):
    """Quantization loses what the format loses, no more. Every weight read back lies within its block's rounding
    bound (ROUNDING); and llama.cpp's top-1 agreement with the float model is our dequantized model's, within 0.05
    (llama.cpp also rounds activations to 8 bits). That agreement is the format's own loss on a random model whose
    top logits are close together: measured 97% for q8_0 and 47% for q4_0, for both."""
    from berrylm.export import load_any
    from berrylm.export.verify import check_llama_cpp, ours_logits, prompt_ids

    model, tok, files = model_and_files
    deq, _ = load_any(files[dtype])
    theirs = deq.state_dict()
    for name, w in model.state_dict().items():
        err, w = (theirs[name] - w).abs(), w.abs()
        if w.shape[-1] % 32 == 0:  # quantized in blocks of 32 along a row
            amax = w.reshape(-1, 32).amax(1, keepdim=True)
            assert (err.reshape(-1, 32) <= amax * ROUNDING[dtype] + 1e-7).all(), name
        else:
            assert (err <= w * 1e-3 + 1e-7).all(), name  # kept as float
    format_top1 = float(np.concatenate([ours_logits(deq, ids).argmax(-1) == ours_logits(model, ids).argmax(-1)
                                        for ids in prompt_ids(tok)]).mean())
    worst, top1, same, n = check_llama_cpp(model, tok, files[dtype], n_new=8)
    print(f"{dtype}: max dlogits {worst:.3g}, top-1 agreement {top1:.1%} (dequantized {format_top1:.1%}), "
          f"greedy 8 identical {same}/{n}")
    assert top1 >= format_top1 - 0.05
    assert format_top1 >= (0.9 if dtype == "q8_0" else 0.4)  # catches a format far lossier than this one
    assert files[dtype].stat().st_size < files["f32"].stat().st_size / (3 if dtype == "q8_0" else 5)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_match_llama_cpp_reproduces_its_arithmetic(model_and_files, dtype):
    """llama.cpp rounds a quantized matmul's input to 8 bits; `match_llama_cpp` does the same, so prompt logits
    agree to float noise (~1e-6) instead of ~1e-1, except on prompts where one 8-bit rounding lands the
    other way (a float32 ulp apart), which then shows as ~1e-2."""
    from llama_cpp import Llama

    from berrylm.export.gguf_reader import load_gguf
    from berrylm.export.verify import prompt_ids

    _, tok, files = model_and_files
    llm = Llama(str(files[dtype]), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False, n_ctx=256)
    plain, emulated = load_gguf(files[dtype])[0], load_gguf(files[dtype], match_llama_cpp=True)[0]
    worst = {"plain": [], "emulated": []}
    for ids in prompt_ids(tok):
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        with torch.no_grad():
            for name, m in (("plain", plain), ("emulated", emulated)):
                worst[name].append(float(np.abs(m(torch.tensor([ids]))[0].numpy() - theirs).max()))
    print(dtype, {k: [f"{x:.1e}" for x in v] for k, v in worst.items()})
    assert min(worst["plain"]) > 1e-2
    assert np.median(worst["emulated"]) <= 1e-5


def test_gguf_reader_round_trip(model_and_files):
    from berrylm.export import load_any

    model, tok, files = model_and_files
    m2, t2 = load_any(files["f32"])
    ids = torch.tensor([tok.encode(UNICODE)])
    with torch.no_grad():
        assert (m2(ids) - model(ids)).abs().max().item() <= 1e-5
    assert t2.encode(UNICODE) == tok.encode(UNICODE) and t2.eos_ids[0] == tok.im_end_id
    assert t2.chat_template == tok.chat_template
    m4, _ = load_any(files["q4_0"])  # dequantized q4_0 is close to llama.cpp on the same file
    from llama_cpp import Llama

    llm = Llama(str(files["q4_0"]), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False, n_ctx=256)
    llm.eval(ids[0].tolist()[:64])
    with torch.no_grad():
        ours = m4(ids[:, :64])[0].numpy()
    assert (np.array(llm.scores[:64]).argmax(-1) == ours.argmax(-1)).mean() >= 0.8


def test_hybrid_refused(tmp_path, tokenizer):
    from berrylm.export.gguf_writer import export_gguf
    from berrylm.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(make_checkpoint(tmp_path / "hy", tokenizer, "strawberry-1.8m"))
    with pytest.raises(ValueError, match="llama.cpp has no such architecture") as e:
        export_gguf(model, tok, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_malformed_and_foreign_gguf_refused(model_and_files, tmp_path):
    import gguf

    from berrylm.export import load_any

    _, _, files = model_and_files
    data = files["f32"].read_bytes()
    cases = {"trunc.gguf": data[: len(data) // 3], "header.gguf": data[:20], "magic.gguf": b"GGML" + data[4:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError) as e:
            load_any(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        load_any(tmp_path / "mamba.gguf")
