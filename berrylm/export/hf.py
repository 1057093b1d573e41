"""Export to a Hugging Face directory that stock transformers loads (LlamaForCausalLM + a fast tokenizer).

Our weight layout already is HF's (rotate-half RoPE, [out, in] matrices), so the export is a renaming:

    tok_emb.weight                    -> model.embed_tokens.weight (lm_head tied: stored once)
    layers.{i}.attn.{wq,wk,wv,wo}     -> model.layers.{i}.self_attn.{q,k,v,o}_proj
    layers.{i}.mlp.{w_gate,w_up,w_down} -> model.layers.{i}.mlp.{gate,up,down}_proj
    layers.{i}.{attn,mlp}_norm        -> model.layers.{i}.{input,post_attention}_layernorm
    norm.weight                       -> model.norm.weight

The hybrid has no transformers class: for it we write our own checkpoint format plus a README saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from berrylm.model.checkpoint import load_generation_config, save_checkpoint
from berrylm.model.config import ModelConfig
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer

HF_NAMES = {  # ours (after "layers.{i}.") -> HF (after "model.layers.{i}.")
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict under HF llama names (tied lm_head omitted)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if model.cfg.tie_embeddings:
                continue
            name = k
        elif k == "tok_emb.weight":
            name = "model.embed_tokens.weight"
        elif k == "norm.weight":
            name = "model.norm.weight"
        else:
            _, i, rest = k.split(".", 2)
            name = f"model.layers.{i}.{HF_NAMES[rest]}"
        out[name] = v.detach().to(dtype).contiguous().cpu()
    return out


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None, "eos_token_id": tok.eos_ids, "pad_token_id": tok.endoftext_id,
        "torch_dtype": dtype, "initializer_range": cfg.init_std, "use_cache": True,
    }


def tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json (specials + chat template), special_tokens_map.json,
    chat_template.jinja: what AutoTokenizer and every other runtime's HF loader read."""
    tok.tk.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(tok.chat_template)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in sorted(tok.special_ids.items(), key=lambda x: x[1])}
    eos = tok.eos_tokens[0]
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
            "bos_token": tok.bos_token, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": None,
            "additional_special_tokens": [t for t in tok.special_ids if t not in (eos, "<|endoftext|>")],
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": max_len, "chat_template": tok.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    smap = {"eos_token": eos, "pad_token": "<|endoftext|>",
            "additional_special_tokens": tcfg["additional_special_tokens"]}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def export_hf(model: Transformer, tok: Tokenizer, out: str | Path, dtype: str = "f32",
              ckpt: str | Path | None = None) -> str:
    """Write the HF directory; returns the one line to print."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--to safetensors supports --dtype {', '.join(TORCH_DTYPES)} (got '{dtype}')")
    out = Path(out)
    cfg = model.cfg
    gen = load_generation_config(ckpt) if ckpt else {}
    if not cfg.is_llama:
        save_checkpoint(out, model, tok, dtype=TORCH_DTYPES[dtype], generation_config=gen or None)
        (out / "README.md").write_text(
            f"# {cfg.name} (berrylm hybrid)\n\nThis is the Strawberry hybrid architecture (linear-attention heads, "
            "per-head gates, mini-experts). Stock transformers, llama.cpp and Ollama cannot run it: the directory "
            "is a berrylm checkpoint (safetensors weights, tokenizer.json, chat_template.jinja). Run it with "
            f"`berry serve --model {out.name}` or export it to ONNX (`berry export ... --to onnx`).\n")
        return (f"{cfg.name} is a hybrid (not llama): wrote a berrylm checkpoint to {out} (safetensors); "
                "stock transformers cannot run it - use berry serve or --to onnx")
    out.mkdir(parents=True, exist_ok=True)
    torch_name = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    save_file(hf_state_dict(model, TORCH_DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok, torch_name), indent=2) + "\n")
    gen_hf = {"bos_token_id": None, "eos_token_id": tok.eos_ids, "pad_token_id": tok.endoftext_id,
              "do_sample": True, "temperature": gen.get("temperature", 0.7), "top_p": gen.get("top_p", 0.9),
              "max_new_tokens": gen.get("max_new_tokens", 256)}
    (out / "generation_config.json").write_text(json.dumps(gen_hf, indent=2) + "\n")
    tokenizer_files(tok, out, cfg.max_seq_len)
    return f"wrote {out} (LlamaForCausalLM, {dtype}): AutoModelForCausalLM.from_pretrained('{out}') loads it"
