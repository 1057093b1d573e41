"""Import a llama-architecture GGUF made by anyone: weights (dequantized with `gguf.quants`), the BPE
tokenizer rebuilt as a `tokenizers` Tokenizer with the pre-tokenizer the file names, and the chat template.

llama.cpp's pre-tokenizer names map to split rules (facts from llama.cpp's vocabulary code):
    gpt-2                      the GPT-2 split (ByteLevel use_regex)
    smollm, starcoder, refact  every digit alone, then the GPT-2 split
    llama-bpe, dbrx, smaug-bpe the llama-3 regex (numbers in groups of up to 3)
    qwen2, deepseek-r1-qwen    the qwen2 regex (one digit per token)
A SentencePiece ("llama") vocabulary becomes a byte-fallback BPE whose merges follow the piece scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from berrylm.export.gguf_check import check_gguf
from berrylm.model.config import ModelConfig, ModelFileError
from berrylm.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch only where weights are read: config and tokenizer readers run without it
    from collections.abc import Callable

    import torch

    from berrylm.model.transformer import Transformer

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": "gpt2", "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
                  "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "dbrx": _LLAMA3, "smaug-bpe": _LLAMA3,
                  "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4
# llama.cpp's CPU matmul converts the activations to the weight type's partner ("vec_dot_type") first
ACT_QUANT = {"Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "Q4_1": "q8_1", "Q5_1": "q8_1",
             "Q2_K": "q8_k", "Q3_K": "q8_k", "Q4_K": "q8_k", "Q5_K": "q8_k", "Q6_K": "q8_k",
             "F16": "f16", "BF16": "bf16"}


def quantize_act(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., d] -> (x rounded the way llama.cpp quantizes activations before a quantized matmul, fix).
    q8_0/q8_1: blocks of 32, q = round(x * 127/amax), d = amax/127 stored as fp16; q8_k: blocks of 256, scale
    from the signed max, fp32. q8_1 also stores s = fp16(d * sum(q)) per block, which the *_1 weight types
    multiply by their block minimum: `fix` [..., nb] = s - fp16(d) * sum(q) is what that adds (else None)."""
    import torch

    if kind in ("f16", "bf16"):
        return x.to(torch.float16 if kind == "f16" else torch.bfloat16).to(x.dtype), None
    block = 256 if kind == "q8_k" else 32
    if x.shape[-1] % block:
        return x, None
    xb = x.float().reshape(*x.shape[:-1], -1, block)  # [..., nb, block]
    if kind == "q8_k":
        idx = xb.abs().argmax(-1, keepdim=True)
        mx = xb.gather(-1, idx)  # signed value of largest magnitude
        iscale = torch.where(mx != 0, torch.full_like(mx, -127.0) / mx, torch.zeros_like(mx))
        q = torch.round(iscale * xb).clamp(max=127)
        d = torch.where(mx != 0, torch.ones_like(mx) / iscale, torch.zeros_like(mx))
    else:
        amax = xb.abs().amax(-1, keepdim=True)
        # a true division: torch's `scalar / tensor` multiplies by a reciprocal, off by an ulp at times
        iscale = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        q = torch.round(xb * iscale)
        d = (amax / 127.0).half().float()
    fix = None
    if kind == "q8_1":
        qsum = q.sum(-1)  # [..., nb]
        fix = ((amax[..., 0] / 127.0) * qsum).half().float() - d[..., 0] * qsum
    return (q * d).reshape(x.shape).to(x.dtype), fix


def _llama_cpp_linear(mod: torch.nn.Linear, kind: str, mins: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] as llama.cpp's CPU matmul computes it; mins [out, nb]: block minimums of a
    *_1 weight (its dot adds min * s per block)."""
    import torch

    xq, fix = quantize_act(x, kind)
    y = torch.nn.functional.linear(xq, mod.weight)
    return y if fix is None or mins is None else y + fix @ mins.T


def emulate_llama_cpp(model: Transformer, weight_types: dict[str, str], mins: dict[str, np.ndarray]) -> None:
    """Make every Linear compute like llama.cpp's CPU matmul for that weight's GGML type (an instance forward;
    weights and state dict untouched). The arithmetic then agrees to float32 noise, but not bit for bit
    (summation order, exp approximations): where a value sits on an 8-bit rounding boundary the two round
    differently, and a model with large activations (SmolLM2) amplifies that to ~1 logit."""
    from functools import partial

    import torch

    for name, mod in model.named_modules():
        kind = ACT_QUANT.get(weight_types.get(f"{name}.weight", "F32"))
        if isinstance(mod, torch.nn.Linear) and kind:
            m = mins.get(f"{name}.weight")
            mod.forward = partial(_llama_cpp_linear, mod, kind, None if m is None else torch.from_numpy(m))


class GGUFFile:
    """Metadata fields and tensors of one GGUF file; every failure is one ValueError line."""

    def __init__(self, path: Path):
        self.path = path
        # counts, lengths and offsets checked against the file's size, and the metadata read (gguf_check.py)
        header = check_gguf(path)
        self.fields = header.fields
        self.types = {name: t for name, (t, _, _) in header.tensors.items()}
        self.shapes = {name: tuple(dims) for name, (_, dims, _) in header.tensors.items()}  # innermost first
        self.offsets = {name: header.data_start + off for name, (_, _, off) in header.tensors.items()}

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def need(self, key: str):
        if key not in self.fields:
            raise ModelFileError(f"{self.path}: GGUF metadata lacks '{key}'")
        return self.fields[key]

    def int(self, key: str, default=None, low: int = 1) -> int:
        """A required (default None) or optional integer field, at least `low`."""
        v = self.need(key) if default is None else self.get(key, default)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise ModelFileError(f"{self.path}: GGUF metadata '{key}' must be an integer >= {low}, not {v!r:.40}")
        return int(v)

    def float(self, key: str, default: float) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
            raise ModelFileError(f"{self.path}: GGUF metadata '{key}' must be a number, not {v!r:.40}")
        return float(v)

    def raw(self, name: str, mm: np.ndarray) -> np.ndarray:
        """A tensor's stored data from the file's bytes `mm`, shaped as the gguf package's reader shapes it: F32/F16
        as [rows..., row] of that dtype, other types as uint8 [rows..., bytes per row] (what gguf.quants.dequantize
        takes). gguf_check verified that it lies inside the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType[self.types[name]]
        dims = list(reversed(self.shapes[name]))  # outermost first
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims)) // block * type_size
        data = mm[self.offsets[name]:self.offsets[name] + n_bytes]
        if qtype.name in ("F32", "F16"):
            return data.view(np.float32 if qtype.name == "F32" else np.float16).reshape(dims)
        return data.reshape(dims[:-1] + [dims[-1] // block * type_size])

    def tensors(self):
        """Yield (name, float32 numpy array in [out, in] order, block minimums [out, nb] of a Q4_1/Q5_1
        tensor or None): the embedding, then block by block (blk.0, blk.1, blk.2, ...; files often list them
        sorted as text, blk.1 then blk.10), then the rest. The data is read through a memory map of the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        def order(name: str) -> tuple[int, int]:
            parts = name.split(".")
            if name.startswith("token_embd."):
                return (0, 0)
            return (1, int(parts[1])) if parts[0] == "blk" and parts[1].isdigit() else (2, 0)

        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        for name in sorted(self.types, key=order):  # stable: a block's tensors keep the file's order
            qtype = GGMLQuantizationType[self.types[name]]
            data = self.raw(name, mm)
            try:
                a = _dequantize_rows(data, qtype, dequantize)
            except NotImplementedError:
                raise ValueError(f"{self.path}: tensor {name} has type {qtype.name}, which "
                                 "gguf.quants cannot dequantize") from None
            except Exception as e:
                raise ValueError(f"{self.path}: tensor {name} unreadable ({str(e).splitlines()[0]})") from None
            shape = tuple(reversed(self.shapes[name]))
            mins = None
            if qtype.name in ("Q4_1", "Q5_1"):  # block layout: d (f16), m (f16), quants
                block, size = GGML_QUANT_SIZES[qtype]
                raw = np.ascontiguousarray(data).reshape(-1, size)[:, 2:4].copy()
                mins = raw.view(np.float16).astype(np.float32).reshape(shape[0], shape[1] // block)
            yield name, np.asarray(a, dtype=np.float32).reshape(shape), mins


def _dequantize_rows(data: np.ndarray, qtype, dequantize, rows: int = 4096) -> np.ndarray:
    """A tensor's float32 values, dequantized `rows` rows at a time into one array: gguf's dequantize makes several
    temporaries the size of its input, which for a 49k-row embedding were ~0.3 GB of peak memory at load."""
    if data.ndim != 2 or data.shape[0] <= rows or qtype.name in ("F32", "F16", "BF16"):
        return dequantize(data, qtype)
    first = dequantize(data[:rows], qtype)
    out = np.empty((data.shape[0],) + first.shape[1:], dtype=np.float32)
    out[:rows] = first
    for i in range(rows, data.shape[0], rows):
        out[i:i + rows] = dequantize(data[i:i + rows], qtype)
    return out


def gguf_config(g: GGUFFile, name: str) -> ModelConfig:
    arch = g.need("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: unsupported architecture '{arch}' (only llama GGUF files can be imported)")
    scaling = g.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in g.shapes:
        raise ValueError(f"{g.path}: RoPE scaling is not supported")
    dim, n_heads = g.int("llama.embedding_length"), g.int("llama.attention.head_count")
    emb = g.shapes.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise ModelFileError(f"{g.path}: no 2-D token_embd.weight tensor")
    head_dim = g.int("llama.attention.key_length", dim // n_heads)
    if g.int("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{g.path}: partial RoPE (rope.dimension_count != head dim) is not supported")
    cfg = ModelConfig(
        name=name, vocab_size=int(emb[1]), dim=dim, n_layers=g.int("llama.block_count"),
        n_heads=n_heads, n_kv_heads=g.int("llama.attention.head_count_kv", n_heads), head_dim=head_dim,
        ffn_dim=g.int("llama.feed_forward_length"), max_seq_len=g.int("llama.context_length", 2048),
        rope_theta=g.float("llama.rope.freq_base", 10000.0),
        norm_eps=g.float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in g.shapes)
    return cfg


def spm_tokenizer(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int],
                  space_prefix: bool):
    """llama.cpp's SentencePiece ("llama") vocabulary as a `tokenizers` BPE: spaces become U+2581 (and one is
    prepended to each text segment), the pair whose merged piece scores highest merges first (so the merge
    rank of a pair is the score rank of its result), characters not in the vocabulary fall back to <0xXX>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}
    ranked = []  # (-score of merged piece, its id, left id, right id, left, right)
    for i, t in enumerate(tokens):
        if t in normal and len(t) > 1:
            for k in range(1, len(t)):
                if t[:k] in normal and t[k:] in normal:
                    ranked.append((-scores[i], i, vocab[t[:k]], vocab[t[k:]], t[:k], t[k:]))
    merges = [(a, b) for *_, a, b in sorted(ranked)]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=True,
                                unk_token=next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)))
    space = [normalizers.Prepend("\u2581")] if space_prefix else []
    tk.normalizer = normalizers.Sequence(space + [normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tk


def gguf_tokenizer(g: GGUFFile) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = g.need("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{g.path}: tokenizer model '{kind}' is not supported (only gpt2-style byte-level BPE "
                         "and llama SentencePiece)")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "llama":
        tk = spm_tokenizer(tokens, list(g.need("tokenizer.ggml.scores")), types, vocab,
                           bool(g.get("tokenizer.ggml.add_space_prefix", True)))
    else:
        pre = g.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{g.path}: pre-tokenizer '{pre}' is not supported (known: {', '.join(PRE_TOKENIZERS)})")
        merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        rule = PRE_TOKENIZERS[pre]
        if rule == "gpt2":
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif rule == "digits+gpt2":
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior="isolated"),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
        tk.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def tok_of(key):
        i = g.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = [t for t in (tok_of("tokenizer.ggml.eos_token_id"), tok_of("tokenizer.ggml.eot_token_id")) if t]
    tpl = g.get("tokenizer.chat_template")
    kwargs = {"chat_template": tpl} if tpl else {}
    return Tokenizer(tk, special_tokens=specials, eos_tokens=list(dict.fromkeys(eos)) or None,
                     bos_token=tok_of("tokenizer.ggml.bos_token_id"), **kwargs)


def _our_name(path: Path, name: str, inverse: dict) -> str:
    fixed = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or parts[2] not in inverse:
        raise ModelFileError(f"{path}: unexpected tensor '{name[:80]}' for a llama model")
    return f"layers.{parts[1]}.{inverse[parts[2]]}"


def _check_tensor_shapes(g: GGUFFile, cfg: ModelConfig, expected: dict, inverse: dict) -> None:
    """Every tensor the config implies is in the file with its shape (GGUF lists dims innermost first)."""
    seen = {}
    for name, dims in g.shapes.items():
        ours = _our_name(g.path, name, inverse)
        seen[ours] = tuple(reversed([int(d) for d in dims]))
        if ours not in expected or seen[ours] != tuple(expected[ours]):
            raise ModelFileError(f"{g.path}: tensor '{name}' has shape {seen[ours]}, metadata implies "
                                 f"{tuple(expected.get(ours, ()))}")
    missing = sorted(set(expected) - set(seen) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise ModelFileError(f"{g.path}: tensors missing: {', '.join(missing[:3])}")


def load_gguf(path: str | Path, match_llama_cpp: bool = False,
              each_block: Callable | None = None) -> tuple[Transformer, Tokenizer]:
    """`match_llama_cpp`: compute matmuls with quantized weights as llama.cpp's CPU backend does (it rounds
    their inputs to 8 bits first); see emulate_llama_cpp.
    `each_block(model, i)`: called for blocks 0, 1, ... in order, each as soon as its weights and the embedding are
    in the model (a server quantizes it there: model/quantize.py's Quantizer), so the float model need not exist
    whole; the final norm and lm_head come after the last call."""
    import torch

    from berrylm.export.gguf_writer import GGUF_NAMES, rope_unpermute
    from berrylm.model.transformer import Transformer

    path = Path(path)
    g = GGUFFile(path)
    cfg = gguf_config(g, path.stem)
    tok = gguf_tokenizer(g)
    inverse = {v: k for k, v in GGUF_NAMES.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_tensor_shapes(g, cfg, expected, inverse)  # before allocating
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    loaded, types, mins = {}, {}, {}
    streamed: set[str] = set()  # names already handed to the model (and maybe quantized away) by each_block
    blocks = [{k for k in expected if k.startswith(f"layers.{i}.")} for i in range(cfg.n_layers)]
    next_block = 0

    def hand_over() -> None:
        nonlocal next_block
        if "tok_emb.weight" not in streamed:
            if "tok_emb.weight" not in loaded:
                return
            model.tok_emb.weight = torch.nn.Parameter(loaded.pop("tok_emb.weight"), requires_grad=False)
            if cfg.tie_embeddings:
                model.lm_head.weight = model.tok_emb.weight
            streamed.add("tok_emb.weight")
        while next_block < cfg.n_layers and blocks[next_block] <= loaded.keys():
            prefix = f"layers.{next_block}."
            model.layers[next_block].load_state_dict({k[len(prefix):]: loaded.pop(k) for k in blocks[next_block]},
                                                     assign=True)
            streamed.update(blocks[next_block])
            each_block(model, next_block)
            next_block += 1

    for name, a, m in g.tensors():
        if name == "token_embd.weight":
            ours = "tok_emb.weight"
        elif name == "output_norm.weight":
            ours = "norm.weight"
        elif name == "output.weight":
            ours = "lm_head.weight"
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in inverse:
                raise ValueError(f"{path}: unexpected tensor '{name}' for a llama model")
            ours = f"layers.{parts[1]}.{inverse[parts[2]]}"
            if parts[2] in ("attn_q.weight", "attn_k.weight"):
                heads = cfg.n_heads if parts[2] == "attn_q.weight" else cfg.n_kv_heads
                a = rope_unpermute(a, heads)
                m = None if m is None else rope_unpermute(m, heads)
        if ours not in expected or tuple(a.shape) != tuple(expected[ours]):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(a.shape)}, metadata implies "
                             f"{tuple(expected.get(ours, ()))}")
        types[ours] = g.types[name]
        if m is not None:
            mins[ours] = m
        own = a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous  # else a view of the mmap
        loaded[ours] = torch.from_numpy(a if own else np.array(a, dtype=np.float32))
        if each_block is not None:
            hand_over()
    from berrylm.export.hf_reader import load_complete

    for k in streamed:
        expected.pop(k)
    load_complete(model, loaded, expected, path, assign=True)  # float32 already: no second copy of the weights
    if each_block is not None:
        hand_over()  # the embedding came last (it has no order in the file format)
    if cfg.tie_embeddings:
        types["lm_head.weight"] = types["tok_emb.weight"]
        if "tok_emb.weight" in mins:
            mins["lm_head.weight"] = mins["tok_emb.weight"]
    if match_llama_cpp:
        emulate_llama_cpp(model, types, mins)
    return model.eval(), tok
