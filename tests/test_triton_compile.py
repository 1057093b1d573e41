"""The Triton kernels compiled for real NVIDIA targets on this CPU machine: registers, spills, shared memory.

No GPU is needed to compile: Triton lowers a kernel to PTX and runs its bundled ptxas for a named target
(GPUTarget), and ptxas -v reports registers and spills. So every CPU CI run checks
that the launch configs the kernels pick (kernels/triton_linear_attention.py `_fwd_candidates`, the sampler's
and the decode step's) fit the shared memory of current GPUs and do not spill where they did before:
sm_90 (H100/H200, 227 KB of shared memory per block), sm_86 (consumer Ampere, 99 KB), sm_80 (A100, 163 KB).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")  # the test extra installs it; only an exotic platform lacks a wheel

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter run redefines triton.jit: nothing to compile
    pytest.skip("compiled-kernel checks run outside the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from berrylm.kernels import triton_linear_attention as tla  # noqa: E402
from berrylm.kernels import triton_sampling as ts  # noqa: E402

SHARED_LIMIT = {90: 232448, 86: 101376, 80: 166912}  # bytes of shared memory one block may use
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def ptxas_report(ptx: str, cc: int) -> dict[str, int]:
    """Registers, stack frame and spill-store bytes that ptxas reports for `ptx` on sm_<cc>. Triton bundles two
    ptxas builds; the newer one reads the PTX versions every Triton release writes."""
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"berry-{os.getpid()}.ptx"
    src.write_text(ptx)
    try:
        for exe in ("ptxas-blackwell", "ptxas"):
            if not (BIN / exe).exists():
                continue
            r = subprocess.run([str(BIN / exe), "-v", f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}", str(src),
                                "-o", os.devnull], capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", r.stderr)
                return {"regs": int(regs.group(1)), "stack": int(spill.group(1)) if spill else 0,
                        "spill": int(spill.group(2)) if spill else 0}
        raise AssertionError(f"no bundled ptxas in {BIN} assembled the kernel: {r.stderr[-500:]}")
    finally:
        src.unlink()


def compile_report(kernel, types: dict[str, str], constexprs: dict, cc: int, num_warps: int,
                   num_stages: int = 3) -> dict[str, int]:
    """Compile `kernel` for sm_<cc>: shared memory (bytes, Triton's metadata), registers and spills (ptxas).
    `types` maps each pointer/int argument to a Triton type string (*bf16, *fp32, i32, ...)."""
    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps,
                                                                      "num_stages": num_stages})
    return {"shared": k.metadata.shared, **ptxas_report(k.asm["ptx"], cc)}


def test_ptxas_is_bundled():
    if platform.machine() != "x86_64":
        pytest.skip(f"Triton bundles NVIDIA's binary tools on x86_64 only (this is {platform.machine()})")
    assert (BIN / "ptxas").exists() or (BIN / "ptxas-blackwell").exists(), BIN


def la_fwd_types(elem: str) -> dict[str, str]:
    ptr = {n: f"*{elem}" for n in ("Q", "K", "V", "G", "OUT")} | {n: "*fp32" for n in ("S0", "Z0", "S1", "Z1")}
    return ptr | {n: "i32" for n in tla._la_fwd_kernel.arg_names if n not in ptr}


@pytest.mark.parametrize("cc", [90, 86])
@pytest.mark.parametrize("D,dtype", [(32, torch.bfloat16), (64, torch.bfloat16), (128, torch.bfloat16),
                                     (64, torch.float32)])
def test_forward_first_config_fits(cc, D, dtype):
    """The forward's first launch config fits every target's shared memory; in bf16 it spills nothing on sm_90
    (the config the GPU benchmark times); fp32 (tf32x3) is allowed a small spill, recorded in the kernel file."""
    if platform.machine() != "x86_64":
        pytest.skip("needs Triton's bundled ptxas/cuobjdump (x86_64 wheels)")
    BLOCK_D = max(16, triton.next_power_of_2(D))
    split = D > 32  # the few-(sequence, head) case, which splits value columns
    BLOCK_DV, CH, warps, stages, prec = tla._fwd_candidates(BLOCK_D, dtype, split, True)[0]
    elem = "bf16" if dtype == torch.bfloat16 else "fp32"
    consts = dict(HAS_GATE=True, HAS_STATE=True, D=D, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, CH=CH, PREC=prec)
    r = compile_report(tla._la_fwd_kernel, la_fwd_types(elem), consts, cc, warps, stages)
    print(f"la_fwd sm_{cc} D={D} {elem} {prec} BLOCK_DV={BLOCK_DV} CH={CH} warps={warps} stages={stages}: {r}")
    assert r["shared"] <= SHARED_LIMIT[cc], r
    if cc == 90:
        assert r["spill"] <= (0 if dtype != torch.float32 else 256), r


@pytest.mark.parametrize("D", [32, 64, 128])
def test_decode_step_does_not_spill(D):
    if platform.machine() != "x86_64":
        pytest.skip("needs Triton's bundled ptxas/cuobjdump (x86_64 wheels)")
    BLOCK_D = max(16, triton.next_power_of_2(D))
    types = {n: "*bf16" for n in ("Q", "K", "V", "G", "OUT")} | {"S": "*fp32", "Z": "*fp32", "SLOTS": "*i64"}
    types |= {n: "i32" for n in tla._la_step_kernel.arg_names if n not in types}
    consts = dict(HAS_GATE=True, D=D, BLOCK_D=BLOCK_D)
    r = compile_report(tla._la_step_kernel, types, consts, 90, 4 if BLOCK_D <= 64 else 8)
    assert r["spill"] == 0 and r["shared"] <= SHARED_LIMIT[90], r


@pytest.mark.parametrize("V", [49152, 152064])
def test_sampler_fits_and_does_not_spill(V):
    if platform.machine() != "x86_64":
        pytest.skip("needs Triton's bundled ptxas/cuobjdump (x86_64 wheels)")
    BLOCK_V = min(triton.next_power_of_2(V), 4096)  # as sample_triton picks on CUDA
    types = {"L": "*fp32", "stride": "i32", "TEMP": "*fp32", "TOPK": "*i64", "TOPP": "*fp32", "MINP": "*fp32",
             "SEED": "*i64", "STEP": "*i64", "TOK": "*i64", "LP": "*fp32", "MASK": "*i8", "V": "i32"}
    consts = dict(BLOCK_V=BLOCK_V, BLOCK_S=min(BLOCK_V, 512), NP=16, WRITE_MASK=False)
    r = compile_report(ts._sample_kernel, types, consts, 90, 8)
    print(f"sampler sm_90 V={V}: {r}")
    assert r["spill"] == 0 and r["shared"] <= SHARED_LIMIT[90], r
