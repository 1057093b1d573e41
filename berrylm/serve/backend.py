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

    def __init__(self, model, tokenizer, name: str = "berry", quantize: str = "none", owns_model: bool = False,
                 quantize_note: str | None = None):
        """owns_model: nothing else uses `model`, so its separate q/k/v and gate/up weights are freed once fused.
        A model quantized while it was read (QuantizeWhileLoading) is served as it is."""
        n_params = model.num_params()
        self.model, self.tokenizer, self.name = model.eval().fuse_for_inference(owns_model), tokenizer, name
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if getattr(model, "quantized", None):
            self.quantize, self.quantize_note = model.quantized, quantize_note or "as asked"
            return
        self.quantize, self.quantize_note = pick_quantize(self.model, quantize, n_params)
        self.quantize_note = quantize_note or self.quantize_note
        if self.quantize != "none":
            from berrylm.model.quantize import CALIBRATION
            from berrylm.model.quantize import quantize as _quantize

            _quantize(self.model, self.quantize, tokenizer.encode(CALIBRATION))
            _release_freed_memory()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        return self.model(tokens, cache=cache)


class QuantizeWhileLoading:
    """each_block(model, i) for export's GGUF reader (load_gguf): fuses each block as soon as it is read and, when
    --quantize resolves to int8, quantizes it there (model/quantize.py: Quantizer), so a server's float model never
    exists whole (SmolLM2-135M: engine peak 1287 -> 800 MB). The mode is resolved at block 0 (auto times that block
    and the tied lm_head); `finish` quantizes the lm_head once the reader is done."""

    def __init__(self, mode: str, tokenizer):
        self.mode, self.note, self.tokenizer, self.quantizer = mode, "as asked", tokenizer, None
        self.seen = False

    def __call__(self, model, i: int) -> None:
        block = model.layers[i]
        if i == 0:
            n_params = model.num_params()
            model.norm.fused = True
            block.fuse(release=True)
            self.mode, self.note = pick_quantize(model, self.mode, n_params)
            if self.mode != "none":
                from berrylm.model.quantize import CALIBRATION, Quantizer

                self.quantizer = Quantizer(self.mode, self.tokenizer.encode(CALIBRATION))
                self.quantizer.begin(model)
        block.fuse(release=True)
        if self.quantizer is not None:
            self.quantizer.block(model, i)
        self.seen = True

    def finish(self, model) -> None:
        if self.quantizer is not None:
            self.quantizer.end(model)
            _release_freed_memory()


def _mmap_large_buffers() -> None:
    """Make glibc give every buffer of 1 MB or more its own mapping, returned to the OS when freed. By default the
    threshold rises to the size of each freed mapping, so after the float weights are dropped the next ones come
    from the heap and freed weights stay resident: SmolLM2-135M int8, peak 1375 -> 1252 MB while loading."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


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


def pick_quantize(model, mode: str, n_params: int | None = None) -> tuple[str, str]:
    """Resolve --quantize for a fused model: (mode, why). n_params: the model's size before fusing (a fused model
    that released its separate weights counts fewer)."""
    if mode not in QUANTIZE:
        raise ValueError(f"unknown --quantize '{mode}' (choose from {', '.join(QUANTIZE)})")
    if mode != "auto":
        return mode, "as asked"
    n_params = model.num_params() if n_params is None else n_params
    if n_params < AUTO_MIN_PARAMS:
        return "none", f"auto: {n_params / 1e6:.1f}M parameters, below {AUTO_MIN_PARAMS / 1e6:.0f}M"
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
    if dev.type == "cpu":
        _mmap_large_buffers()
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
        name = path.stem if path.is_file() else path.name
        header = load_foreign(path, weights=False) if quantize != "none" and dev.type == "cpu" and dt == torch.float32 \
            else None
        if header is not None and (quantize == "int8" or header[0].tie_embeddings):  # (auto times the tied head)
            streamed = QuantizeWhileLoading(quantize, header[1])
            m, tok = load_foreign(path, each_block=streamed)
            if streamed.seen:  # a GGUF file: read block by block
                streamed.finish(m)
                return TorchBackend(m.eval(), tok, name, streamed.mode, owns_model=True, quantize_note=streamed.note)
        else:
            m, tok = load_foreign(path)
        m = m.to(device=dev, dtype=dt).eval()
    return TorchBackend(m, tok, name, quantize, owns_model=True)
