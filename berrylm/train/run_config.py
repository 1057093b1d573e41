"""TrainConfig: every knob of a training run (pretraining or SFT), a plain dataclass with no heavy imports
so that the command line can take its defaults without loading torch. Stored in each checkpoint's training
state as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    out: str
    preset: str = "berry-1.8m"
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    steps: int = 0  # 0: max_tokens / batch_tokens
    max_tokens: int = 0
    batch_tokens: int = 16384
    seq_len: int = 256
    micro_batch: int = 16
    lr: float = 3e-3
    muon_lr: float = 0.02
    min_lr_frac: float = 0.1
    warmup: int = 50
    decay: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    compile: bool = False
    eval_every: int = 200
    ckpt_every: int = 100
    sample_every: int = 500
    log_every: int = 10
    val_tokens: int = 65536
    seed: int = 0
    threads: int = 0
    resume: bool = False
    save_dtype: str = "float32"
    kind: str = "pretrain"
    command: str = ""
