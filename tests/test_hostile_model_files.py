"""Hostile model files fail fast: a corpus generated here (no blobs committed) of GGUF files with impossible counts,
lengths, offsets and metadata, berrylm checkpoints and HF directories whose config.json lies about types, ranges or
the weights' size. Each one, given to `berry serve` (and `berry info` for checkpoints), gets one line on stderr,
exit code 2, within a bound that guards against hangs, and a peak RSS no larger than the file plus a constant over
loading a valid tiny model."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


# --- a tiny GGUF byte builder (the format, written out by hand so the files can be anything) ---
def _s(b: str | bytes) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", v))


def _str(key: str, v: str) -> bytes:
    return _kv(key, 8, _s(v))


def _gguf(kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]] = (), n_kv=None, n_tensors=None,
          data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = b"".join(kvs)
    for name, dims, ttype, off in tensors:
        body += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", ttype, off)
    out = head + body
    out += b"\0" * (-len(out) % 32)
    return out + data


LLAMA = [_str("general.architecture", "llama"), _u32("llama.embedding_length", 64),
         _u32("llama.attention.head_count", 4), _u32("llama.block_count", 2), _u32("llama.feed_forward_length", 128)]


def _llama_kvs(**override) -> list[bytes]:
    base = {"general.architecture": _str("general.architecture", "llama"),
            "llama.embedding_length": _u32("llama.embedding_length", 64),
            "llama.attention.head_count": _u32("llama.attention.head_count", 4),
            "llama.block_count": _u32("llama.block_count", 2),
            "llama.feed_forward_length": _u32("llama.feed_forward_length", 128)}
    base.update(override)
    return list(base.values())


def gguf_corpus(d: Path) -> dict[str, Path]:
    files = {
        # an array of 2^40 uint8 elements in a 113-byte file (the reader looped, growing ~140 MB/s)
        "array-2^40": _gguf([_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 0, 1 << 40))]),
        # an array of 2^40 strings
        "string-array-2^40": _gguf([_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 40))]),
        "string-2^62": _gguf([_kv("general.name", 8, struct.pack("<Q", 1 << 62))]),
        "kv-count-2^60": _gguf([], n_kv=1 << 60),
        "tensor-count-2^60": _gguf([], n_tensors=1 << 60),
        "tensor-past-eof": _gguf(LLAMA, [("token_embd.weight", [64, 512], 0, 0)], data=b"\0" * 64),
        "tensor-offset-2^62": _gguf(LLAMA, [("token_embd.weight", [64, 2], 0, 1 << 62)], data=b"\0" * 512),
        "tensor-dims-9": _gguf(LLAMA, [("token_embd.weight", [1] * 9, 0, 0)], data=b"\0" * 64),
        "unknown-value-type": _gguf([_kv("general.name", 99, b"")]),
        "block-count-3M": _gguf(_llama_kvs(**{"llama.block_count": _u32("llama.block_count", 3_000_000)}),
                                [("token_embd.weight", [64, 8], 0, 0)], data=b"\0" * 2048),
        "head-count-0": _gguf(_llama_kvs(**{"llama.attention.head_count": _u32("llama.attention.head_count", 0)}),
                              [("token_embd.weight", [64, 8], 0, 0)], data=b"\0" * 2048),
        "dim-as-array": _gguf(_llama_kvs(**{"llama.embedding_length": _kv("llama.embedding_length", 9,
                                                                           struct.pack("<IQ", 4, 2) + b"\0" * 8)}),
                              [("token_embd.weight", [64, 8], 0, 0)], data=b"\0" * 2048),
        "dim-as-string": _gguf(_llama_kvs(**{"llama.embedding_length": _str("llama.embedding_length", "64")}),
                               [("token_embd.weight", [64, 8], 0, 0)], data=b"\0" * 2048),
        "shape-mismatch": _gguf(_llama_kvs(), [("token_embd.weight", [32, 8], 0, 0)], data=b"\0" * 1024),
        "truncated-header": _gguf(LLAMA)[:40],
    }
    out = {}
    for name, data in files.items():
        (d / f"{name}.gguf").write_bytes(data)
        out[f"gguf:{name}"] = d / f"{name}.gguf"
    return out


def checkpoint_corpus(d: Path, good: Path) -> dict[str, Path]:
    cfg = json.loads((good / "config.json").read_text())
    variants = {"n_layers-3M": {"n_layers": 3_000_000}, "dim-string": {"dim": "160"},
                "n_layers-float": {"n_layers": 5.0}, "norm_eps-string": {"norm_eps": "x"}, "heads-0": {"n_heads": 0},
                "dim-array": {"dim": [64]}, "vocab-negative": {"vocab_size": -5},
                "huge-but-valid": {"dim": 8192, "n_layers": 64, "ffn_dim": 32768}, "shape-lie": {"ffn_dim": 130}}
    out = {}
    for name, change in variants.items():
        p = d / f"ckpt-{name}"
        shutil.copytree(good, p)
        (p / "config.json").write_text(json.dumps({**cfg, **change}))
        out[f"ckpt:{name}"] = p
    p = d / "ckpt-truncated-weights"
    shutil.copytree(good, p)
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    out["ckpt:truncated-weights"] = p
    return out


def hf_corpus(d: Path, tokenizer) -> dict[str, Path]:
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 24,
            "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 4096, "vocab_size": 49152,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    variants = {"336M-20-bytes": {},
                "164GB": {"hidden_size": 65536, "intermediate_size": 200000, "vocab_size": 1 << 20},
                "hidden-string": {"hidden_size": "1024"}, "heads-0": {"num_attention_heads": 0},
                "layers-3M": {"num_hidden_layers": 3_000_000}, "eps-string": {"rms_norm_eps": "x"}}
    out = {}
    for name, change in variants.items():
        p = d / f"hf-{name}"
        p.mkdir()
        (p / "config.json").write_text(json.dumps({**base, **change}))
        (p / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0" * 10)  # a 20-byte file
        tokenizer.save(p)
        out[f"hf:{name}"] = p
    return out


def _peak_rss(*args: str, timeout: float = 60) -> tuple[int, str, float, int]:
    """-> (exit code, stderr, seconds, peak RSS in bytes) of `berry ARGS`; the timeout guards against a hang."""
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "berrylm", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = t + timeout
    err = b""
    os.set_blocking(proc.stderr.fileno(), False)
    while True:
        chunk = proc.stderr.read() or b""
        err += chunk
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            err += proc.stderr.read() or b""
            return os.waitstatus_to_exitcode(status), err.decode(errors="replace"), time.monotonic() - t, \
                ru.ru_maxrss * 1024
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"berry {' '.join(args)} still running after {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def baseline_rss(llama_checkpoint) -> int:
    """The constant part: peak RSS of `berry info` on a valid tiny checkpoint, or of `berry serve` up to its model
    load (an invalid flag is refused right after the imports)."""
    code, err, _, info = _peak_rss("info", str(llama_checkpoint))
    assert code == 0, err
    code, err, _, serve = _peak_rss("serve", str(llama_checkpoint), "--max-batch", "0")
    assert code == 1 and "--max-batch" in err, err
    return max(info, serve)


def test_hostile_model_files_fail_fast(tmp_path, llama_checkpoint, baseline_rss, tokenizer):
    corpus = {**gguf_corpus(tmp_path), **checkpoint_corpus(tmp_path, llama_checkpoint),
              **hf_corpus(tmp_path, tokenizer)}
    report = []
    for name, path in corpus.items():
        commands = [("serve", str(path), "--port", "1", "--engine-thread")]
        if name in ("hf:336M-20-bytes", "ckpt:truncated-weights", "ckpt:shape-lie"):  # found by the engine process
            commands.append(("serve", str(path), "--port", "1"))
        if name in ("ckpt:n_layers-3M", "ckpt:dim-string", "ckpt:norm_eps-string", "ckpt:huge-but-valid"):
            commands.append(("info", str(path)))
        for cmd in commands:
            code, err, secs, rss = _peak_rss(*cmd)
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
            lines = [x for x in err.splitlines() if x.strip()]
            report.append(f"{name:28s} {cmd[0]:5s} exit {code} {secs:5.1f} s rss +{(rss - baseline_rss) / MB:6.1f} MB"
                          f"  {lines[-1][:110] if lines else ''}")
            assert code == 2, f"{name} {cmd[0]}: exit {code}\n{err}"
            assert len(lines) == 1 and lines[0].startswith(f"berry {cmd[0]}: error: "), f"{name}: {err}"
            assert rss <= baseline_rss + size + 64 * MB, f"{name}: peak RSS {rss / MB:.0f} MB"
    print("\n" + "\n".join(report))
