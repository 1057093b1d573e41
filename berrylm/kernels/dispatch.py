"""When the Triton kernels run instead of the PyTorch references: one decision, made once, for every kernel.

The kernels run on CUDA tensors when a usable Triton imports; everywhere else (CPU, MPS, no Triton, a Triton
too old) the references in this package run, and callers never branch on the device. BERRY_FORCE_TRITON=1
runs the kernels off CUDA too (the tests, under TRITON_INTERPRET=1 on CPU); BERRY_FORCE_TRITON=0 turns them off.

Version floor: Triton 3.1 and 3.2 (torch 2.5/2.6) abort inside LLVM, killing the process rather than raising,
when they compile the linear-attention forward for sm_90 at head_dim <= 32 ("Failed to emit transfer from
register to shared"); 3.3 and later compile it. An older Triton is therefore treated as absent.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import torch

MIN_TRITON = (3, 3)


_UNCHECKED = object()
_problem: object = _UNCHECKED


def triton_problem() -> str | None:
    """None when a usable Triton is importable, else why not (checked once per process; a plain global rather
    than functools.lru_cache, which torch.compile traces through with a warning)."""
    global _problem
    if _problem is _UNCHECKED:
        _problem = _find_problem()
    return _problem  # type: ignore[return-value]


def _find_problem() -> str | None:
    try:
        import triton
    except ImportError as e:
        return f"triton is not importable ({e})"
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))} "
                "(it aborts compiling the linear-attention forward on sm_90)")
    return None


def force_triton() -> bool | None:
    """BERRY_FORCE_TRITON: "1" forces the kernels (also off CUDA), "0" forbids them, unset decides by device."""
    flag = os.environ.get("BERRY_FORCE_TRITON", "")
    return True if flag == "1" else False if flag == "0" else None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for inputs like `x`."""
    forced = force_triton()
    if forced is False or not (x.is_cuda or forced):
        return False
    return triton_problem() is None


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the thread's current CUDA device: make it x's (an engine thread serving cuda:1 would
    otherwise launch on GPU 0 with GPU 1 pointers)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"berry kernels: {message}", file=sys.stderr, flush=True)


def is_out_of_resources(e: BaseException) -> bool:
    """A launch config that needs more shared memory or registers than this GPU has (Triton's OutOfResources)."""
    return type(e).__name__ == "OutOfResources"
