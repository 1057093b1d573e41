"""The seam between the engine and a model runtime.

A backend offers `cfg`, `tokenizer`, `device`, `dtype`, `name` and `forward(tokens [B, T], cache) -> logits
[B, T, V] float32` through the cache protocol of model/cache.py (the engine passes a serve.kv_cache.PagedBatch).
`TorchBackend` runs our Transformer; serve/onnx_backend.py's `OnnxBackend` runs an ONNX export (explicit cache
tensors) in onnxruntime. `load_backend` resolves MODEL: a checkpoint dir or embedded name (model.checkpoint), else
an exported HF dir / GGUF file through the `load_foreign` reader its caller passes in (`berry serve` passes
export's `load_any`; serve never imports export), or with backend "onnx" an ONNX export dir.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from berrylm.model.config import ModelConfig
from berrylm.serve.model_info import is_berry_dir

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class Backend:
    cfg: ModelConfig
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    name: str

    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(Backend):
    """quantize: none (the exact float path), int8 (model/quantize.py), or auto (int8 where it measures faster here;
    see `pick_quantize`). `self.quantize` is the mode in use and `self.quantize_note` says why."""

    def __init__(self, model, tokenizer, name: str = "berry", quantize: str = "none", owns_model: bool = False):
        """owns_model: nothing else uses `model`, so its separate q/k/v and gate/up weights are freed once fused."""
        self.model, self.tokenizer, self.name = model.eval().fuse_for_inference(owns_model), tokenizer, name
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.quantize, self.quantize_note = pick_quantize(self.model, quantize)
        if self.quantize != "none":
            from berrylm.model.quantize import CALIBRATION
            from berrylm.model.quantize import quantize as _quantize

            _quantize(self.model, self.quantize, tokenizer.encode(CALIBRATION))
            _release_freed_memory()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        return self.model(tokens, cache=cache)


def _release_freed_memory() -> None:
    """Hand the dropped float weights back to the OS: glibc keeps freed heap pages otherwise (SmolLM2-135M int8:
    resident 1.45 GB -> 1.0 GB, measured)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


QUANTIZE = ("auto", "none", "int8")
AUTO_MIN_PARAMS = 20e6  # below this, weights are not what a decode step waits on (bench/serve.py on berry-chat)


def pick_quantize(model, mode: str) -> tuple[str, str]:
    """Resolve --quantize for a fused model: (mode, why)."""
    if mode not in QUANTIZE:
        raise ValueError(f"unknown --quantize '{mode}' (choose from {', '.join(QUANTIZE)})")
    if mode != "auto":
        return mode, "as asked"
    if model.num_params() < AUTO_MIN_PARAMS:
        return "none", f"auto: {model.num_params() / 1e6:.1f}M parameters, below {AUTO_MIN_PARAMS / 1e6:.0f}M"
    from berrylm.model.quantize import choose_mode

    return choose_mode(model)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(device)


def load_backend(model: str | None, backend: str = "torch", device: str = "auto", dtype: str = "auto",
                 quantize: str = "none", load_foreign: Callable | None = None) -> Backend:
    """`load_foreign(path) -> (Transformer, Tokenizer)` reads a model file that is not a berrylm checkpoint."""
    if backend == "onnx":
        if quantize not in ("auto", "none"):
            raise ValueError("--quantize int8 is for --backend torch")
        if device not in ("auto", "cpu") or dtype not in ("auto", "float32", "fp32"):
            raise ValueError("--backend onnx runs the float32 export on CPU (use --device cpu --dtype float32)")
        if model is None or not Path(model).is_dir():
            raise ValueError("--backend onnx needs MODEL = an ONNX export directory (berry export CKPT --to onnx)")
        from berrylm.serve.onnx_backend import OnnxBackend

        return OnnxBackend(model)
    if backend != "torch":
        raise ValueError(f"unknown backend '{backend}' (choose torch or onnx)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    dev = pick_device(device)
    dt = DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    from berrylm.model.checkpoint import load_checkpoint, resolve

    path = Path(model) if model else None
    is_checkpoint = path is None or not path.exists() or (path.is_dir() and (path / "config.json").exists()
                                                           and is_berry_dir(path))
    if is_checkpoint:
        m, tok = load_checkpoint(resolve(model), device=dev, dtype=dt)
        name = resolve(model).name
    elif (path / "model.onnx").is_file():
        raise ValueError(f"{model} is an ONNX export: serve it with --backend onnx")
    else:
        if load_foreign is None:
            raise ValueError(f"{model}: not a berrylm checkpoint (a GGUF file or HF directory is read by the "
                             "load_foreign reader `berry serve` passes in)")
        m, tok = load_foreign(path)
        m = m.to(device=dev, dtype=dt).eval()
        name = path.stem if path.is_file() else path.name
    return TorchBackend(m, tok, name, quantize, owns_model=True)
