"""Export a llama-architecture model to one GGUF file (arch `llama`) with the `gguf` package.

Tensors: token_embd (tied output: llama.cpp reuses it when output.weight is absent), blk.N.{attn_norm,
attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}, output_norm. Norms stay f32;
matrices are f32/f16/bf16/q8_0/q4_0 (a matrix whose rows are not a multiple of the block size falls back
to f16). llama.cpp applies RoPE to adjacent pairs (x0, x1), (x2, x3)...; our weights use the rotate-half
pairing (x_i, x_{i+hd/2}), so the rows of Q and K are permuted per head to make the two agree.
The tokenizer is our byte-level BPE as `gpt2` with pre-tokenizer `gpt-2`; our specials are CONTROL tokens.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from berrylm.model.tokenizer import ENDOFTEXT, IM_END, Tokenizer
from berrylm.model.transformer import Transformer

QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
GGUF_NAMES = {  # ours (after "layers.{i}.") -> GGUF (after "blk.{i}.")
    "attn_norm.weight": "attn_norm.weight", "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight", "attn.wo.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w_gate.weight": "ffn_gate.weight", "mlp.w_up.weight": "ffn_up.weight", "mlp.w_down.weight": "ffn_down.weight",
}


def gguf_file_name(cfg, dtype: str) -> str:
    """The file name every GGUF export gets: NAME-DTYPE.gguf (berry export --to gguf / ollama)."""
    return f"{cfg.name}-{dtype}.gguf"


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*hd, in] rotate-half row order -> llama.cpp's interleaved pair order."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of rope_permute."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Our state dict as float32 numpy arrays under GGUF names, Q/K permuted (tied lm_head omitted)."""
    cfg = model.cfg
    out = {}
    for k, v in model.state_dict().items():
        a = v.detach().float().cpu().numpy()
        if k == "lm_head.weight":
            if cfg.tie_embeddings:
                continue
            out["output.weight"] = a
        elif k == "tok_emb.weight":
            out["token_embd.weight"] = a
        elif k == "norm.weight":
            out["output_norm.weight"] = a
        else:
            _, i, rest = k.split(".", 2)
            if rest == "attn.wq.weight":
                a = rope_permute(a, cfg.n_heads)
            elif rest == "attn.wk.weight":
                a = rope_permute(a, cfg.n_kv_heads)
            out[f"blk.{i}.{GGUF_NAMES[rest]}"] = a
    return out


def _encode(a: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        return a.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(a, qtype), qtype


def add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, n_vocab: int) -> None:
    n_tok = tok.vocab_size
    tokens = [tok.id_to_token(i) for i in range(n_tok)]
    special = set(tok.special_ids.values())
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(n_tok)]
    tokens += [f"[PAD{i}]" for i in range(n_tok, n_vocab)]  # embedding rows beyond the tokenizer
    types += [gguf.TokenType.UNUSED] * (n_vocab - n_tok)
    merges = [" ".join(m) if isinstance(m, list) else m for m in _spec(tok)["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.tk.token_to_id(IM_END))
    w.add_eot_token_id(tok.tk.token_to_id(IM_END))
    w.add_pad_token_id(tok.tk.token_to_id(ENDOFTEXT))
    w.add_bos_token_id(tok.tk.token_to_id(ENDOFTEXT))  # llama.cpp wants one; never added (add_bos false)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)


def _spec(tok: Tokenizer) -> dict:
    import json

    return json.loads(tok.tk.to_str())


def export_gguf(model: Transformer, tok: Tokenizer, out_file: str | Path, dtype: str = "f32") -> str:
    """Write `out_file`; returns the one line to print."""
    cfg = model.cfg
    if not cfg.is_llama:
        raise ValueError(f"{cfg.name} is a hybrid (linear-attention heads, gates, mini-experts): llama.cpp has no "
                         "such architecture, so it cannot be exported to GGUF (use --to onnx)")
    if dtype not in QTYPES:
        raise ValueError(f"--to gguf supports --dtype {', '.join(QTYPES)} (got '{dtype}')")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_name(cfg.name)
    w.add_file_type(FILE_TYPES[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hparams = {  # llama.* metadata, from the berrylm config
        w.add_context_length: cfg.max_seq_len, w.add_embedding_length: cfg.dim, w.add_block_count: cfg.n_layers,
        w.add_feed_forward_length: cfg.ffn_dim, w.add_head_count: cfg.n_heads, w.add_head_count_kv: cfg.n_kv_heads,
        w.add_key_length: cfg.head_dim, w.add_value_length: cfg.head_dim, w.add_rope_dimension_count: cfg.head_dim,
        w.add_rope_freq_base: cfg.rope_theta, w.add_layer_norm_rms_eps: cfg.norm_eps, w.add_vocab_size: cfg.vocab_size,
    }
    for add, value in hparams.items():
        add(value)
    add_tokenizer(w, tok, cfg.vocab_size)
    with torch.no_grad():
        for name, a in gguf_tensors(model).items():
            data, qt = _encode(a, QTYPES[dtype])
            w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f"wrote {out_file} (GGUF llama, {dtype}, {out_file.stat().st_size / 1e6:.1f} MB)"
