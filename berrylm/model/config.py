"""ModelConfig: the plain dataclass every stage shares, plus the named presets.

A config with `n_linear_heads == 0`, `head_gate == False` and `n_experts == 0` is exactly the llama
architecture (RMSNorm pre-norm, SwiGLU, RoPE, GQA, tied embeddings) that transformers, llama.cpp and
Ollama load as `llama`. Anything else is the hybrid "Strawberry" family that only berrylm runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


class ModelFileError(ValueError):
    """A model file (config, weights, GGUF) that cannot be loaded; the message is one line naming the file and the
    problem. `berry` prints it and exits with code 2."""


# field -> (low, high) for the integer and float fields; every model we can serve fits well inside these, and
# anything outside would only allocate or loop for a very long time before failing
LIMITS = {"vocab_size": (1, 1 << 21), "dim": (1, 1 << 16), "n_layers": (1, 1024), "n_heads": (1, 1024),
          "n_kv_heads": (0, 1024), "head_dim": (2, 4096), "ffn_dim": (0, 1 << 18), "max_seq_len": (1, 1 << 30),
          "rope_theta": (1e-3, 1e12), "norm_eps": (1e-12, 0.1), "init_std": (0.0, 10.0),
          "n_linear_heads": (0, 1024), "n_experts": (0, 1024), "expert_dim": (0, 1 << 18),
          "experts_top_k": (1, 1024), "aux_loss_coef": (0.0, 1e3)}


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 4096
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6  # all attention heads (softmax + linear)
    n_kv_heads: int = 2  # key/value heads shared by the softmax heads (GQA)
    head_dim: int = 32
    ffn_dim: int = 512  # SwiGLU hidden size (dense MLP)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # --- Strawberry hybrid knobs (all off = llama) ---
    n_linear_heads: int = 0  # the last n_linear_heads of n_heads are linear-attention heads
    head_gate: bool = False  # per-token sigmoid gate on every head's output
    n_experts: int = 0  # >0: the MLP is n_experts mini SwiGLU experts with a top-k router
    expert_dim: int = 0  # hidden size of each mini-expert
    experts_top_k: int = 2
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):  # types first: "160", 5.0, [160] or true are not a dimension
            v, kind = getattr(self, f.name), f.type
            if kind == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                problems.append(f"{f.name} must be an integer, not {v!r:.40}")
            elif kind == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                problems.append(f"{f.name} must be a finite number, not {v!r:.40}")
            elif kind == "bool" and not isinstance(v, bool):
                problems.append(f"{f.name} must be true or false, not {v!r:.40}")
            elif kind == "str" and not isinstance(v, str):
                problems.append(f"{f.name} must be a string, not {v!r:.40}")
            elif f.name in LIMITS and not LIMITS[f.name][0] <= v <= LIMITS[f.name][1]:
                problems.append(f"{f.name} = {v} is outside [{LIMITS[f.name][0]}, {LIMITS[f.name][1]}]")
        if problems:
            raise ModelFileError(f"invalid ModelConfig '{str(self.name)[:60]}': " + "; ".join(problems))
        if self.n_experts == 0 and self.ffn_dim < 1:
            problems.append("ffn_dim must be >= 1 for a dense MLP")
        if self.n_linear_heads > self.n_heads:
            problems.append("n_linear_heads > n_heads")
        n_soft = self.n_heads - self.n_linear_heads
        if n_soft > 0 and (self.n_kv_heads <= 0 or n_soft % self.n_kv_heads):
            problems.append(f"softmax heads ({n_soft}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_experts and (self.expert_dim <= 0 or not 0 < self.experts_top_k <= self.n_experts):
            problems.append("experts need expert_dim > 0 and 0 < experts_top_k <= n_experts")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE)")
        if problems:
            raise ModelFileError(f"invalid ModelConfig '{self.name[:60]}': " + "; ".join(problems))

    @property
    def n_softmax_heads(self) -> int:
        return self.n_heads - self.n_linear_heads

    @property
    def is_llama(self) -> bool:
        """True when the architecture is plain llama (exportable to HF/GGUF as `llama`)."""
        return self.n_linear_heads == 0 and not self.head_gate and self.n_experts == 0

    @property
    def arch(self) -> str:
        return "llama" if self.is_llama else "strawberry"

    @property
    def n_kv_cache_heads(self) -> int:
        """K/V heads a layer caches: n_kv_heads when it has softmax heads, else 0 (linear heads keep a state)."""
        return self.n_kv_heads if self.n_softmax_heads else 0

    def num_params(self) -> int:
        """Parameter count (tied embedding counted once)."""
        d, hd = self.dim, self.head_dim
        n_kv = self.n_kv_cache_heads
        attn = d * self.n_heads * hd  # wq
        attn += 2 * d * (n_kv + self.n_linear_heads) * hd  # wk, wv
        attn += self.n_heads * hd * d  # wo
        attn += d * self.n_heads if self.head_gate else 0  # gate
        if self.n_experts:
            mlp = self.n_experts * 3 * d * self.expert_dim + d * self.n_experts
        else:
            mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelFileError(f"unknown ModelConfig fields: {', '.join(unknown)[:200]}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, ModelConfig] = {
    # plain llama, ~1.8M parameters: the embedded default chat model
    "berry-1.8m": ModelConfig(
        name="berry-1.8m", vocab_size=4096, dim=160, n_layers=5, n_heads=5, n_kv_heads=1,
        head_dim=32, ffn_dim=352, max_seq_len=1024,
    ),
    # plain llama, ~8M parameters
    "berry-8m": ModelConfig(
        name="berry-8m", vocab_size=4096, dim=320, n_layers=7, n_heads=10, n_kv_heads=2,
        head_dim=32, ffn_dim=736, max_seq_len=1024,
    ),
    # MiniMind2-small-like dims, for GPU training
    "berry-26m": ModelConfig(
        name="berry-26m", vocab_size=6400, dim=512, n_layers=8, n_heads=8, n_kv_heads=2,
        head_dim=64, ffn_dim=1408, max_seq_len=2048,
    ),
    # the hybrid: per layer 2 softmax + 3 linear heads, all gated per token; 4 mini-experts, top-2
    "strawberry-1.8m": ModelConfig(
        name="strawberry-1.8m", vocab_size=4096, dim=160, n_layers=5, n_heads=5, n_kv_heads=1,
        head_dim=32, ffn_dim=0, max_seq_len=1024, n_linear_heads=3, head_gate=True,
        n_experts=4, expert_dim=72, experts_top_k=2,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)
