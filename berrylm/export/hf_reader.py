"""Import a Hugging Face llama directory (config.json + safetensors, one file or sharded) as our Transformer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from berrylm.export.hf import HF_NAMES
from berrylm.model.config import ModelConfig
from berrylm.model.tokenizer import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from berrylm.model.transformer import Transformer


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return d


def hf_to_config(d: dict, name: str) -> ModelConfig:
    arch = d.get("model_type")
    if arch != "llama" and "LlamaForCausalLM" not in (d.get("architectures") or []):
        raise ValueError(f"{name}: unsupported architecture '{arch}' (only llama can be imported)")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"{name}: RoPE scaling '{kind}' is not supported")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError(f"{name}: llama with biases is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: activation '{d['hidden_act']}' is not supported (only silu)")
    try:
        n_heads = int(d["num_attention_heads"])
        return ModelConfig(
            name=name, vocab_size=int(d["vocab_size"]), dim=int(d["hidden_size"]), n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // n_heads), ffn_dim=int(d["intermediate_size"]),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks {e}") from None


def _our_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "tok_emb.weight"
    if hf == "model.norm.weight":
        return "norm.weight"
    if hf == "lm_head.weight":
        return hf
    parts = hf.split(".", 3)  # model, layers, i, rest
    inverse = {v: k for k, v in HF_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inverse:
        return f"layers.{parts[2]}.{inverse[parts[3]]}"
    raise ValueError(f"unexpected tensor '{hf}'")


def load_hf_tokenizer(path: Path) -> Tokenizer:
    f = path / "tokenizer.json"
    if not f.exists():
        raise ValueError(f"{f}: missing (only fast tokenizers are supported)")
    try:
        tk = HFTokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise ValueError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    tcfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    tpl_file = path / "chat_template.jinja"
    tpl = tpl_file.read_text() if tpl_file.exists() else tcfg.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    if isinstance(tpl, list):  # named templates: take the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"])

    def text(x):
        return x.get("content") if isinstance(x, dict) else x

    specials = [a["content"] for a in json.loads(tk.to_str()).get("added_tokens", []) if a.get("special")]
    eos = text(tcfg.get("eos_token"))
    if all(t in specials for t in SPECIAL_TOKENS) and eos in (None, "<|im_end|>"):
        return Tokenizer(tk, tpl)  # ours
    return Tokenizer(tk, tpl, special_tokens=specials, eos_tokens=[eos] if eos else None,
                     bos_token=text(tcfg.get("bos_token")))


def load_hf(path: str | Path) -> tuple[Transformer, Tokenizer]:
    path = Path(path)
    cfg = hf_to_config(_read_json(path / "config.json"), path.name)
    tok = load_hf_tokenizer(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    model = Transformer(cfg)
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for fn in files:
        f = path / fn
        if not f.exists():
            raise ValueError(f"{f}: missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k.endswith("rotary_emb.inv_freq"):
                        continue
                    ours = _our_name(k)
                    t = sf.get_tensor(k)
                    if tuple(t.shape) != tuple(expected[ours].shape):
                        raise ValueError(f"{f}: tensor {k} has shape {tuple(t.shape)}, config implies "
                                         f"{tuple(expected[ours].shape)}")
                    loaded[ours] = t.float()
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors on truncated / foreign files
            raise ValueError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    load_complete(model, loaded, expected, path)
    return model.eval(), tok


def load_complete(model, loaded: dict, expected: dict, path, assign: bool = False) -> None:
    """Load `loaded` into model after checking every expected tensor is there (the tied head excepted).
    assign: the tensors become the parameters (no copy; they must already have the model's dtype)."""
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: tensors missing: {', '.join(missing[:3])}")
    model.load_state_dict(loaded, strict=False, assign=assign)
    if assign and model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
