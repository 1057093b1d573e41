"""Helpers of bench/gpu_check.sh, the one prepared run on a lent GPU machine (no network there).
Each is `python -m berrylm.bench.gpu_check COMMAND`:

    env                          versions, GPU, bf16 autocast check (markdown)
    prepare-smollm2 GGUF OUT     here, on CPU: SmolLM2's config + real tokenizer and chat template, read from the
                                 GGUF, without weights
    make-models WORK --smollm2 DIR   there: random-weight berry-26m (berry-chat's tokenizer) and SmolLM2-135M
                                 (HF dir) checkpoints
    hybrid [--device cuda]       serve the embedded hybrid: startup, first-request time, one sampled and one
                                 JSON-mode request (markdown)
    train-summary RUN_DIR        one markdown row from a training run's log.jsonl

The 98 MB SmolLM2 GGUF cannot travel to the GPU machine, and random weights are as good as real ones for speed,
so only its config and tokenizer travel (about 2 MB) and the weights are drawn there with our own writers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def repo_root() -> Path:
    p = Path(__file__).resolve().parent
    while p != p.parent and not (p / "pyproject.toml").exists():
        p = p.parent
    return p


def berry_command() -> list[str]:
    """How to start the `berry` CLI from this checkout."""
    return [sys.executable, "-m", "berrylm"]


# ---------------------------------------------------------------- env

def cmd_env(args: argparse.Namespace) -> int:
    lines = [f"- python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), {os.cpu_count()} CPUs"]
    for mod in ("triton", "transformers", "fastapi", "pydantic", "uvicorn", "fla", "numpy", "tokenizers"):
        try:
            m = __import__(mod)
            lines.append(f"- {mod} {getattr(m, '__version__', '?')} ({Path(m.__file__).parent})")
        except Exception as e:  # report what is missing, do not stop
            why = str(e).splitlines()[0][:120] if str(e) else ""
            lines.append(f"- {mod}: not importable ({type(e).__name__}: {why})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"- cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.0f} GiB")
        lines.append(f"- bf16 supported: {torch.cuda.is_bf16_supported()}; "
                     f"tf32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
        lines.append(f"- autocast check (the trainer's and bench/train.py's context): {autocast_check('cuda')}")
    else:
        lines.append("- no CUDA device")
        lines.append(f"- autocast check on CPU (the same code as on CUDA): {autocast_check('cpu')}")
    print("\n".join(lines))
    return 0


def autocast_check(device: str) -> str:
    """Run berry-26m's forward under the same autocast context the trainer uses; report the logits' dtype."""
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    cfg = get_preset("berry-26m", n_layers=1)
    model = Transformer(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    seen = {}
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.update(matmul=out.dtype))
    with torch.autocast(device, torch.bfloat16):
        model(x)
    return f"weights {next(model.parameters()).dtype}, lm_head matmul output {seen['matmul']} (bf16 = autocast on)"


# ---------------------------------------------------------------- fixtures

def cmd_prepare_smollm2(args: argparse.Namespace) -> int:
    """GGUF -> a Hugging Face llama directory without model.safetensors (config, tokenizer, chat template)."""
    from berrylm.export.gguf_reader import GGUFFile, gguf_config, gguf_tokenizer
    from berrylm.export.hf import hf_config, tokenizer_files
    from berrylm.export.hf_reader import hf_to_config, load_hf_tokenizer

    g = GGUFFile(Path(args.gguf))
    cfg = gguf_config(g, "smollm2-135m")
    tok = gguf_tokenizer(g)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok, "bfloat16"), indent=2) + "\n")
    tokenizer_files(tok, out, cfg.max_seq_len)
    gen = {"bos_token_id": None, "eos_token_id": tok.eos_ids, "pad_token_id": tok.endoftext_id, "do_sample": True,
           "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # the directory must read back as the same model and tokenizer
    back, tok2 = hf_to_config(json.loads((out / "config.json").read_text()), "smollm2-135m"), load_hf_tokenizer(out)
    mismatched = [f for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                              "rope_theta", "tie_embeddings") if getattr(back, f) != getattr(cfg, f)]
    if mismatched:
        raise SystemExit(f"config does not round-trip: {mismatched}")
    chat = [{"role": "user", "content": "What is 12 * 7?"}]
    if tok2.encode_chat(chat, add_generation_prompt=True) != tok.encode_chat(chat, add_generation_prompt=True):
        raise SystemExit("tokenizer does not round-trip (chat ids differ)")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size} ({tok.vocab_size} tokens), "
          f"eos {tok.eos_tokens}, {size / 1e6:.1f} MB, {cfg.num_params() / 1e6:.0f}M params (weights drawn later)")
    return 0


def cmd_make_models(args: argparse.Namespace) -> int:
    from berrylm.export.hf import export_hf
    from berrylm.export.hf_reader import hf_to_config, load_hf_tokenizer
    from berrylm.model.checkpoint import load_tokenizer, save_checkpoint
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    work = Path(args.work)
    t0 = time.time()
    tok = load_tokenizer("berry-chat")
    cfg = get_preset("berry-26m")
    if tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"berry-chat's tokenizer ({tok.vocab_size}) does not fit berry-26m ({cfg.vocab_size})")
    torch.manual_seed(0)
    save_checkpoint(work / "berry-26m", Transformer(cfg), tok, dtype=torch.bfloat16)
    print(f"berry-26m: {cfg.num_params() / 1e6:.1f}M params, random weights, berry-chat tokenizer "
          f"({tok.vocab_size} of {cfg.vocab_size} rows) -> {work / 'berry-26m'} ({time.time() - t0:.1f}s)")
    if args.smollm2:
        t0 = time.time()
        src = Path(args.smollm2)
        cfg = hf_to_config(json.loads((src / "config.json").read_text()), "smollm2-135m")
        tok = load_hf_tokenizer(src)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # drawing 135M numbers is faster there
            model = Transformer(cfg)
        export_hf(model, tok, work / "smollm2-135m", dtype="bf16")
        print(f"smollm2-135m: {cfg.num_params() / 1e6:.1f}M params, random weights, SmolLM2's tokenizer "
              f"({tok.vocab_size} tokens) and chat template -> {work / 'smollm2-135m'} ({time.time() - t0:.1f}s)")
    return 0


# ---------------------------------------------------------------- hybrid quick check

def _post(base: str, body: dict, timeout: float = 300.0) -> tuple[float, dict]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=timeout)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, r.json()


def cmd_hybrid(args: argparse.Namespace) -> int:
    import httpx

    from berrylm.bench.serve import free_port, stop

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*berry_command(), "serve", args.model, "--port", str(port), "--device", args.device,
           "--served-model-name", "m"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo_root(), stdout=log, stderr=subprocess.STDOUT)
    rows, ok = [], True
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError(f"server not up in {args.timeout}s: {Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rows.append(("server up (load, warm-up)", f"{time.perf_counter() - t0:.2f} s", ""))
        chat = [{"role": "user", "content": "Tell me about strawberries."}]
        for i, label in enumerate(("first request (sampled, T=0.8, 32 tokens)", "second request (same)")):
            dt, r = _post(base, {"model": "m", "messages": chat, "max_tokens": 32, "temperature": 0.8,
                                 "top_p": 0.9, "seed": i})
            c = r["choices"][0]
            rows.append((label, f"{dt * 1e3:.0f} ms", f"{r['usage']['completion_tokens']} tokens, finish "
                         f"{c['finish_reason']}: {json.dumps((c['message']['content'] or '')[:80])}"))
        dt, r = _post(base, {"model": "m", "max_tokens": 96, "temperature": 0.7, "seed": 3,
                             "messages": [{"role": "user", "content": "Give me a JSON object with your name."}],
                             "response_format": {"type": "json_object"}})
        text = r["choices"][0]["message"]["content"] or ""
        try:
            json.loads(text)
            valid = "valid JSON"
        except ValueError:
            valid = "NOT valid JSON" + (" (cut by max_tokens)" if r["choices"][0]["finish_reason"] == "length" else "")
            ok = ok and r["choices"][0]["finish_reason"] == "length"
        rows.append(("JSON mode (response_format json_object, 96 tokens)", f"{dt * 1e3:.0f} ms",
                     f"{valid}, finish {r['choices'][0]['finish_reason']}: {json.dumps(text[:80])}"))
        if args.device.startswith("cuda"):  # which processes hold GPU memory now (the engine's, on one GPU)
            try:
                q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                rows.append(("GPU processes (nvidia-smi)", "", q.stdout.strip().replace("\n", "; ") or "(none listed)"))
            except (OSError, subprocess.SubprocessError) as e:
                rows.append(("GPU processes (nvidia-smi)", "", f"n/a ({e})"))
        m = httpx.get(base + "/metrics", timeout=5)
        if m.status_code == 200:
            gen = [ln for ln in m.text.splitlines()
                   if ln.startswith(("berry_generation_tokens_total", "berry_sequences_finished_total"))]
            rows.append(("/metrics", "200", "; ".join(gen)[:200]))
    except Exception as e:  # the report carries the failure; the exit code says it failed
        rows.append(("FAILED", "", f"{type(e).__name__}: {str(e)[:1500]}"))
        ok = False
    finally:
        stop(proc)
    banner = [ln for ln in Path(log.name).read_text().splitlines() if ln.startswith("berry serve:")]
    print(f"`{' '.join(cmd[1:])}`" + (f" - {banner[0]}" if banner else ""))
    print("\n| check | time | result |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(x.replace("|", "/").replace("\n", " ") for x in r) + " |")
    if not ok:
        print("\nserver log (tail):\n```\n" + Path(log.name).read_text()[-3000:] + "\n```")
    os.unlink(log.name)
    return 0 if ok else 1


# ---------------------------------------------------------------- training summary

def cmd_train_summary(args: argparse.Namespace) -> int:
    f = Path(args.run) / "log.jsonl"
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    steps = [r for r in recs if "tok_per_s" in r]
    evals = [r for r in recs if "val_loss" in r]
    last = steps[-1] if steps else {}
    tps = max((r["tok_per_s"] for r in steps[1:] or steps), default=float("nan"))  # after the first (compile) window
    mfu = max((r.get("mfu") or 0 for r in steps[1:] or steps), default=0)
    ev = evals[-1] if evals else {}
    print(f"| {args.label} | {last.get('step', '?')} | {last.get('loss', float('nan')):.4f} | {tps:,.0f} | "
          + (f"{mfu:.1%}" if mfu else "-") + f" | {ev.get('val_loss', float('nan')):.4f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m berrylm.bench.gpu_check", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env").set_defaults(func=cmd_env)
    p = sub.add_parser("prepare-smollm2")
    p.add_argument("gguf")
    p.add_argument("out")
    p.set_defaults(func=cmd_prepare_smollm2)
    p = sub.add_parser("make-models")
    p.add_argument("work")
    p.add_argument("--smollm2", default=None, help="directory written by prepare-smollm2")
    p.set_defaults(func=cmd_make_models)
    p = sub.add_parser("hybrid")
    p.add_argument("--model", default="strawberry-1.8m-chat")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for the server to come up")
    p.set_defaults(func=cmd_hybrid)
    p = sub.add_parser("train-summary")
    p.add_argument("run")
    p.add_argument("--label", default="")
    p.set_defaults(func=cmd_train_summary)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
