"""Kernel benchmark: the Triton kernels vs their PyTorch references on one CUDA GPU.

    python -m berrylm.bench.kernels [--quick] [--save | --out FILE.md] [--no-compile]

Linear attention prefill (bf16, gated, with an initial state) and the in-place decode step: time and
achieved memory bandwidth (bytes the op must move / time) for Triton, the reference eager, the reference
under torch.compile, and flash-linear-attention's chunk_linear_attn when `fla` is importable (there on
inputs with the feature map already applied, no gate: a lower bound on the same work).
Sampling: time per batch (B = 1..256, V = 6.4k..128k) with top_k + top_p and with top_p alone, for the
Triton sampler, `sample_ref`, and a plain sort-based top-k/top-p sampler (sort, cumsum, multinomial).
Prints markdown tables with ratios (x = baseline time / Triton time, > 1 means Triton is faster);
--save writes them to bench/results/kernels-<gpu>-<date>.md. Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


DEVICE = "cuda"


def bench_ms(fn, *args) -> float:
    """Median time of fn(*args) in ms (CUDA events, L2 flushed between runs by triton's do_bench)."""
    if DEVICE != "cuda":  # --smoke on CPU under the interpreter: one timed call, meaningless numbers
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(lambda: fn(*args), warmup=10, rep=50, return_mode="median"))


def try_ms(fn, *args) -> float | None:
    """bench_ms for a baseline that may not run here (missing package, compile failure): None then."""
    try:
        fn(*args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return bench_ms(fn, *args)
    except Exception as e:  # a baseline that cannot run is reported as n/a, not a crash
        print(f"  (skipped a baseline: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
              file=sys.stderr)
        return None


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratio(base: float | None, ours: float) -> str:
    return "n/a" if base is None else f"{base / ours:.2f}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fla_prefill(qf, kf, v):
    """flash-linear-attention's chunked linear attention on [B, T, H, D] inputs (layout passed explicitly: old
    releases default to head-first [B, H, T, D] and would silently time a different problem)."""
    import inspect

    from fla.ops.linear_attn import chunk_linear_attn

    kw = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}
    o = chunk_linear_attn(qf, kf, v, scale=1.0, normalize=True, **kw)
    return o[0] if isinstance(o, tuple) else o


def fla_checked(qf, kf, v, q, k) -> str | None:
    """None when FLA is usable here and computes our math (no gate, no state) within bf16 rounding; else why not."""
    from berrylm.kernels.linear_attention import linear_attention_ref

    try:
        o = fla_prefill(qf, kf, v)
    except Exception as e:  # not installed, or fails on this GPU
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    ref, _ = linear_attention_ref(q, k, v)
    err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    return None if err < 2e-2 else f"output differs from ours (relative error {err:.2e})"


def prefill_flops(B: int, T: int, H: int, D: int, chunk: int = 64) -> float:
    """Chunked linear attention per token and head: q k^T and a v within the chunk (4 C D), q S and k^T v
    against the state (4 D^2)."""
    return B * H * T * (4 * chunk * D + 4 * D * D)


def bench_prefill(shapes, use_compile: bool) -> str:
    from berrylm.kernels.linear_attention import feature_map, linear_attention_ref
    from berrylm.kernels.triton_linear_attention import linear_attention_triton

    rows, notes = [], []
    compiled = torch.compile(linear_attention_ref) if use_compile else None
    for B, T, H, D in shapes:
        dt = torch.bfloat16
        q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=dt) for _ in range(3))
        gate = torch.randn(B, T, H, device=DEVICE, dtype=dt)
        state = (torch.rand(B, H, D, D, device=DEVICE), torch.rand(B, H, D, device=DEVICE))
        nbytes = (4 * B * T * H * D + B * T * H) * 2 + 2 * B * H * D * (D + 1) * 4  # q k v o gate + state in/out
        t_tri = bench_ms(linear_attention_triton, q, k, v, gate, state)
        t_ref = try_ms(linear_attention_ref, q, k, v, gate, state)
        t_cmp = try_ms(compiled, q, k, v, gate, state) if compiled else None
        qf, kf = feature_map(q.float()).to(dt), feature_map(k.float()).to(dt)
        why = fla_checked(qf, kf, v, q, k) if DEVICE == "cuda" else "not on CUDA"
        t_fla = try_ms(fla_prefill, qf, kf, v) if why is None else None
        if why is not None and why not in notes:
            notes.append(why)
        rows.append([f"{B}x{T}x{H}x{D}", fmt(t_tri), f"{B * T / t_tri / 1e3:.0f}",
                     f"{prefill_flops(B, T, H, D) / t_tri / 1e9:.1f}", f"{nbytes / t_tri / 1e6:.0f}", fmt(t_ref),
                     ratio(t_ref, t_tri), fmt(t_cmp), ratio(t_cmp, t_tri), fmt(t_fla), ratio(t_fla, t_tri)])
    header = ["B x T x H x D", "triton ms", "Mtok/s", "TFLOP/s", "GB/s", "ref ms", "vs ref", "compiled ms",
              "vs compiled", "fla ms", "vs fla"]
    out = table("Linear attention prefill (bf16, gated, initial state)", header, rows)
    out += ("\nfla: chunk_linear_attn on phi(q), phi(k), no gate and no state (a lower bound on the same work), "
            "checked against our reference before timing." + (f" Not timed: {'; '.join(notes)}." if notes else "")
            + "\n")
    return out


def copy_bandwidth() -> float:
    """The ceiling: GB/s of a 2 GiB device-to-device copy (bytes read + written)."""
    if DEVICE != "cuda":
        return float("nan")
    x = torch.empty(2 ** 29, device=DEVICE)  # 2 GiB fp32
    y = torch.empty_like(x)
    t = bench_ms(y.copy_, x)
    return 2 * x.numel() * 4 / t / 1e6


def bench_decode(batches, H: int, D: int, use_compile: bool, ceiling: float) -> str:
    from berrylm.kernels.linear_attention import linear_attention_step_ref
    from berrylm.kernels.triton_linear_attention import linear_attention_step_triton

    rows = []
    compiled = torch.compile(linear_attention_step_ref) if use_compile else None
    for B in batches:
        N = 2 * B  # a pool larger than the batch, slots scattered
        q, k, v = (torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
        gate = torch.randn(B, H, device=DEVICE, dtype=torch.bfloat16)
        S, z = torch.zeros(N, H, D, D, device=DEVICE), torch.zeros(N, H, D, device=DEVICE)
        slots = torch.randperm(N, device=DEVICE)[:B]
        nbytes = 2 * B * H * D * (D + 1) * 4 + (4 * B * H * D + B * H) * 2  # state read + write, q k v o gate
        t_tri = bench_ms(linear_attention_step_triton, q, k, v, gate, S, z, slots)
        t_ref = try_ms(linear_attention_step_ref, q, k, v, gate, S, z, slots)
        t_cmp = try_ms(compiled, q, k, v, gate, S, z, slots) if compiled else None
        gbs = nbytes / t_tri / 1e6
        rows.append([str(B), fmt(t_tri, 4), f"{gbs:.0f}", f"{gbs / ceiling:.0%}", fmt(t_ref, 4), ratio(t_ref, t_tri),
                     fmt(t_cmp, 4), ratio(t_cmp, t_tri)])
    header = ["B", "triton ms", "triton GB/s", "of copy BW", "ref ms", "vs ref", "compiled ms", "vs compiled"]
    return table(f"Linear attention decode step (H={H}, D={D}, bf16 in, fp32 state pool; copy bandwidth "
                 f"{ceiling:.0f} GB/s)", header, rows)


def sort_sampler(logits, temperature, top_k, top_p, generator=None):
    """A typical sort-based top-k/top-p sampler (the baseline, not our semantics to the bit)."""
    x = logits.float() / temperature.unsqueeze(1)
    sorted_x, order = x.sort(dim=1, descending=True)
    V = x.shape[1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).unsqueeze(1)
    sorted_x = sorted_x.masked_fill(torch.arange(V, device=x.device).unsqueeze(0) >= k, float("-inf"))
    probs = sorted_x.softmax(dim=1)
    drop = probs.cumsum(dim=1) - probs >= top_p.unsqueeze(1)
    probs = probs.masked_fill(drop, 0.0)
    pick = torch.multinomial(probs, 1, generator=generator)
    return order.gather(1, pick).squeeze(1)


def bench_sampling(batches, vocabs) -> str:
    from berrylm.kernels.sampling import sample_ref
    from berrylm.kernels.triton_sampling import sample_triton

    rows = []
    for label, tk, tp in (("top_k=50 top_p=0.9", 50, 0.9), ("top_p=0.9", 0, 0.9)):
        for V in vocabs:
            for B in batches:
                logits = torch.randn(B, V, device=DEVICE) * 3
                args = [torch.full((B,), x, device=DEVICE, dtype=dt) for x, dt in
                        ((0.8, torch.float32), (tk, torch.int64), (tp, torch.float32), (0.0, torch.float32),
                         (1, torch.int64))] + [torch.arange(B, device=DEVICE)]
                t_tri = bench_ms(sample_triton, logits, *args)
                t_ref = try_ms(sample_ref, logits, *args)
                t_sort = try_ms(sort_sampler, logits, *args[:3])
                rows.append([label, str(V), str(B), fmt(t_tri), fmt(t_ref), ratio(t_ref, t_tri), fmt(t_sort),
                             ratio(t_sort, t_tri)])
    header = ["filters", "V", "B", "triton ms", "sample_ref ms", "vs ref", "sort sampler ms", "vs sort"]
    return table("Sampling (temperature 0.8)", header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--save", action="store_true", help="write bench/results/kernels-<gpu>-<date>.md")
    ap.add_argument("--out", help="write the tables to this markdown file")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; with TRITON_INTERPRET=1 also on CPU (checks the script, not speed)")
    args = ap.parse_args(argv)
    global DEVICE
    if args.smoke and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: the Triton kernels run on CUDA only, nothing to benchmark")
        return 0
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter"
    if args.smoke:
        prefill, decode, batches, vocabs = [(2, 70, 2, 32)], [3], [2], [300]
        args.no_compile = True
    elif args.quick:
        prefill, decode, batches, vocabs = [(8, 1024, 4, 64)], [1, 64], [1, 64], [32000]
    else:
        prefill = [(1, 4096, 4, 64), (8, 2048, 4, 64), (32, 512, 4, 32), (16, 1024, 8, 128)]
        decode, batches, vocabs = [1, 16, 64, 256, 1024, 4096], [1, 8, 64, 256], [6400, 32000, 128000]
    use_compile = not args.no_compile
    parts = [f"# Kernel benchmark: {gpu}, torch {torch.__version__}, {datetime.date.today()}\n"]
    ceiling = copy_bandwidth()
    parts.append(f"Device-to-device copy: {ceiling:.0f} GB/s (read + write), the decode table's ceiling.\n")
    for make in (lambda: bench_prefill(prefill, use_compile),
                 lambda: bench_decode(decode, 4, 64, use_compile, ceiling),
                 lambda: bench_decode(decode, 8, 128, use_compile, ceiling),
                 lambda: bench_sampling(batches, vocabs)):
        part = make()
        print(part, flush=True)
        parts.append(part)
    out = args.out
    if args.save and not out:
        name = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
        out = RESULTS / f"kernels-{name}-{datetime.date.today()}.md"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(parts))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
