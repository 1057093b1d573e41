"""Export to ONNX: one decoder graph with explicit cache tensors (optimum / onnxruntime-genai names).

    inputs   input_ids [B, T] int64, attention_mask [B, P+T] int64, position_ids [B, T] int64,
             past_key_values.N.key / .value [B, Hkv, P, hd]              (softmax heads, llama and hybrid)
             past_linear_state.N.S [B, Hl, hd, hd], .z [B, Hl, hd]       (hybrid linear heads only)
    outputs  logits [B, T, V], present.N.key / .value [B, Hkv, P+T, hd],
             present_linear_state.N.S / .z                                (hybrid only)

The model's forward takes a cache object; `TensorCache` is one built around those tensors, so the exported
graph is exactly our Transformer's forward.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from berrylm.export.hf import tokenizer_files
from berrylm.kernels.linear_attention import linear_attention_ref
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer


class TensorCache:
    """The cache protocol of model/cache.py over plain tensors: reads the past, collects the presents."""

    def __init__(self, attention_mask, position_ids, past_kv, past_lin, n_rep: int, chunk: int):
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.past_kv, self.past_lin, self.n_rep, self.chunk = past_kv, past_lin, n_rep, chunk
        self.present_kv: dict[int, tuple] = {}
        self.present_lin: dict[int, tuple] = {}

    def positions(self, T: int) -> torch.Tensor:
        return self.position_ids

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        pk, pv = self.past_kv[layer]
        k_all = torch.cat([pk, k.transpose(1, 2)], dim=2)  # [B, Hkv, P+T, hd]
        v_all = torch.cat([pv, v.transpose(1, 2)], dim=2)
        self.present_kv[layer] = (k_all, v_all)
        T, L = k.shape[1], k_all.shape[2]
        q_pos = torch.arange(T, device=k.device).unsqueeze(1) + (L - T)  # [T, 1]
        causal = torch.arange(L, device=k.device).unsqueeze(0) <= q_pos  # [T, L]
        mask = causal.unsqueeze(0).unsqueeze(0) & self.attention_mask.bool()[:, None, None, :]  # [B, 1, T, L]
        if self.n_rep > 1:  # expand the kv heads here so the graph needs no GQA support
            k_all, v_all = k_all.repeat_interleave(self.n_rep, 1), v_all.repeat_interleave(self.n_rep, 1)
        return k_all, v_all, mask

    def linear_attend(self, layer: int, q, k, v, gate):
        o, state = linear_attention_ref(q, k, v, gate, self.past_lin[layer], chunk=self.chunk)  # one chunk
        self.present_lin[layer] = state
        return o

    def advance(self, T: int) -> None:
        pass


class OnnxDecoder(nn.Module):
    """Tensors in, tensors out: (input_ids, attention_mask, position_ids, *flat past) -> (logits, *flat presents)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, cfg = model, model.cfg
        self.n_soft_layers = cfg.n_layers if cfg.n_softmax_heads else 0
        self.n_lin_layers = cfg.n_layers if cfg.n_linear_heads else 0
        self.n_rep = cfg.n_softmax_heads // cfg.n_kv_heads if cfg.n_softmax_heads else 1

    def forward(self, input_ids, attention_mask, position_ids, *past):
        n = self.n_soft_layers
        past_kv = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
        past_lin = [(past[2 * n + 2 * i], past[2 * n + 2 * i + 1]) for i in range(self.n_lin_layers)]
        cache = TensorCache(attention_mask, position_ids, past_kv, past_lin, self.n_rep, self.model.cfg.max_seq_len)
        logits = self.model(input_ids, cache=cache, positions=position_ids)
        outs = [logits]
        for i in range(n):
            outs += list(cache.present_kv[i])
        for i in range(self.n_lin_layers):
            outs += list(cache.present_lin[i])
        return tuple(outs)


def io_names(cfg) -> tuple[list[str], list[str]]:
    n_soft = cfg.n_layers if cfg.n_softmax_heads else 0
    n_lin = cfg.n_layers if cfg.n_linear_heads else 0
    past, present = [], []
    for i in range(n_soft):
        past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present += [f"present.{i}.key", f"present.{i}.value"]
    for i in range(n_lin):
        past += [f"past_linear_state.{i}.S", f"past_linear_state.{i}.z"]
        present += [f"present_linear_state.{i}.S", f"present_linear_state.{i}.z"]
    return ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + present


def empty_past(cfg, batch: int, past_len: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    n_soft = cfg.n_layers if cfg.n_softmax_heads else 0
    n_lin = cfg.n_layers if cfg.n_linear_heads else 0
    hd, hl = cfg.head_dim, cfg.n_linear_heads
    out = []
    for _ in range(n_soft):
        out += [torch.zeros(batch, cfg.n_kv_heads, past_len, hd, dtype=dtype)] * 2
    for _ in range(n_lin):
        out += [torch.zeros(batch, hl, hd, hd), torch.zeros(batch, hl, hd)]
    return out


def genai_config(cfg, tok: Tokenizer) -> dict:
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    if cfg.n_linear_heads:
        inputs.update(past_linear_state_S_names="past_linear_state.%d.S",
                      past_linear_state_z_names="past_linear_state.%d.z")
        outputs.update(present_linear_state_S_names="present_linear_state.%d.S",
                       present_linear_state_z_names="present_linear_state.%d.z")
    return {"model": {
        "type": "llama" if cfg.is_llama else "strawberry", "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_seq_len, "bos_token_id": tok.endoftext_id, "eos_token_id": tok.eos_ids,
        "pad_token_id": tok.endoftext_id,
        "decoder": {"filename": "model.onnx", "session_options": {"log_id": "berrylm", "provider_options": []},
                    "hidden_size": cfg.dim, "head_size": cfg.head_dim, "num_attention_heads": cfg.n_heads,
                    "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
                    "inputs": inputs, "outputs": outputs}},
        "search": {"do_sample": False, "max_length": cfg.max_seq_len, "num_beams": 1, "num_return_sequences": 1,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "past_present_share_buffer": False}}


def export_onnx(model: Transformer, tok: Tokenizer, out: str | Path, dtype: str = "f32") -> str:
    if dtype != "f32":
        raise ValueError(f"--to onnx supports --dtype f32 only (got '{dtype}')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    wrapper = OnnxDecoder(model.float().eval())
    B, T, P = 2, 12, 3  # example shapes; every axis below is exported dynamic
    args = (torch.randint(0, cfg.vocab_size, (B, T)), torch.ones(B, P + T, dtype=torch.long),
            torch.arange(P, P + T).expand(B, T).contiguous(), *empty_past(cfg, B, P))
    names_in, names_out = io_names(cfg)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in names_in[3:]:
        axes[n] = {0: "batch", 2: "past_sequence"} if "key_values" in n else {0: "batch"}
    for n in names_out[1:]:
        axes[n] = {0: "batch", 2: "total_sequence"} if n.startswith("present.") else {0: "batch"}
    # TorchScript exporter (fast, honours dynamic_axes). It has no GQA form of SDPA; TensorCache already
    # repeats the kv heads, so during export SDPA is called without the (then no-op) enable_gqa flag.
    sdpa = F.scaled_dot_product_attention

    def sdpa_no_gqa(*a, enable_gqa: bool = False, **kw):
        return sdpa(*a, **kw)

    with warnings.catch_warnings(), torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", sdpa_no_gqa):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(out / "model.onnx"), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    (out / "genai_config.json").write_text(json.dumps(genai_config(cfg, tok), indent=2) + "\n")
    tokenizer_files(tok, out, cfg.max_seq_len)
    note = "" if cfg.is_llama else " (hybrid: extra linear-state inputs/outputs; onnxruntime runs it, genai does not)"
    return f"wrote {out}/model.onnx{note}"
