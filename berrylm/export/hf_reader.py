"""Import a Hugging Face llama directory (config.json + safetensors, one file or sharded) as our Transformer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from berrylm.export.hf import HF_NAMES
from berrylm.model.config import ModelConfig, ModelFileError
from berrylm.model.tokenizer import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

if TYPE_CHECKING:  # torch only where weights are read: config and tokenizer readers run without it
    import torch

    from berrylm.model.transformer import Transformer


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{f}: unreadable JSON ({(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(d, dict):
        raise ModelFileError(f"{f}: expected a JSON object")
    return d


def _int(d: dict, key: str, name: str, default=None) -> int:
    v = d.get(key, default)
    if v is None:
        raise ModelFileError(f"{name}: config.json lacks '{key}'")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ModelFileError(f"{name}: config.json '{key}' must be an integer, not {v!r:.40}")
    return v


def _float(d: dict, key: str, name: str, default: float) -> float:
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ModelFileError(f"{name}: config.json '{key}' must be a number, not {v!r:.40}")
    return float(v)


def hf_to_config(d: dict, name: str) -> ModelConfig:
    arch = d.get("model_type")
    if arch != "llama" and "LlamaForCausalLM" not in (d.get("architectures") or []):
        raise ValueError(f"{name}: unsupported architecture '{arch}' (only llama can be imported)")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise ModelFileError(f"{name}: config.json rope_parameters / rope_scaling must be objects")
    kind = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"{name}: RoPE scaling '{kind}' is not supported")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError(f"{name}: llama with biases is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: activation '{str(d['hidden_act'])[:40]}' is not supported (only silu)")
    n_heads, dim = _int(d, "num_attention_heads", name), _int(d, "hidden_size", name)
    if n_heads < 1:
        raise ModelFileError(f"{name}: config.json num_attention_heads must be >= 1, not {n_heads}")
    return ModelConfig(
        name=name, vocab_size=_int(d, "vocab_size", name), dim=dim, n_layers=_int(d, "num_hidden_layers", name),
        n_heads=n_heads, n_kv_heads=_int(d, "num_key_value_heads", name, n_heads),
        head_dim=_int(d, "head_dim", name, dim // n_heads), ffn_dim=_int(d, "intermediate_size", name),
        max_seq_len=_int(d, "max_position_embeddings", name, 2048),
        rope_theta=_float(rope, "rope_theta", name, _float(d, "rope_theta", name, 10000.0)),
        norm_eps=_float(d, "rms_norm_eps", name, 1e-6), tie_embeddings=d.get("tie_word_embeddings", False) is True)


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
        raise ModelFileError(f"{f}: missing (only fast tokenizers are supported)")
    try:
        tk = HFTokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise ModelFileError(f"{f}: cannot load tokenizer ({(str(e).splitlines() or [''])[0][:200]})") from None
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
    import torch

    from berrylm.model.checkpoint import check_safetensors, expected_shapes
    from berrylm.model.transformer import Transformer

    path = Path(path)
    cfg = hf_to_config(_read_json(path / "config.json"), path.name)
    tok = load_hf_tokenizer(path)
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        wm = _read_json(index).get("weight_map")
        files = sorted(set(wm.values())) if isinstance(wm, dict) else []
        if not files or any(not isinstance(f, str) or Path(f).name != f for f in files):
            raise ModelFileError(f"{index}: weight_map must map tensor names to file names in this directory")
    with torch.device("meta"):
        model = Transformer(cfg)

    def rename(k: str) -> str | None:
        if k.endswith("rotary_emb.inv_freq"):
            return None
        try:
            return _our_name(k)
        except ValueError as e:
            raise ModelFileError(f"{path}: {e}") from None

    expected = expected_shapes(model)
    if cfg.tie_embeddings:  # some tied exports still store lm_head.weight
        expected_any = {**expected, "lm_head.weight": expected["tok_emb.weight"]}
        with_head = _has_key([path / f for f in files], "lm_head.weight")
        expected = expected_any if with_head else expected
    check_safetensors([path / f for f in files], expected, rename)  # every tensor is there: now allocate
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    loaded: dict[str, torch.Tensor] = {}
    for fn in files:
        f = path / fn
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    ours = rename(k)
                    if ours is not None:
                        loaded[ours] = sf.get_tensor(k).float()
        except ModelFileError:
            raise
        except Exception as e:  # safetensors' own errors on truncated / foreign files
            raise ModelFileError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    load_complete(model, loaded, model.state_dict(), path)
    return model.eval(), tok


def _has_key(files: list[Path], key: str) -> bool:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                if key in sf.keys():
                    return True
        except Exception:  # noqa: BLE001 - check_safetensors reports the file
            return False
    return False


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
