"""`berry export CKPT --to safetensors|gguf|onnx|ollama [--dtype ...] --out DIR [--verify]`."""

from __future__ import annotations

import argparse

TARGETS = ("safetensors", "gguf", "onnx", "ollama")
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to safetensors (HF), GGUF, Ollama or ONNX")
    p.add_argument("checkpoint", help="checkpoint directory or embedded model name")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights: f32 (default; q8_0 for ollama); gguf/ollama also f16, bf16, q8_0, q4_0")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--verify", action="store_true", help="load the export in its runtime and compare logits")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from berrylm.export import verify
    from berrylm.model.checkpoint import load_checkpoint, load_generation_config, resolve

    ckpt = resolve(args.checkpoint)
    model, tok = load_checkpoint(ckpt)
    out = Path(args.out)
    dtype = args.dtype or ("q8_0" if args.to == "ollama" else "f32")
    rows = []
    if args.to == "safetensors":
        from berrylm.export.hf import export_hf

        print(export_hf(model, tok, out, dtype, ckpt))
        if args.verify and model.cfg.is_llama:
            rows.append(("transformers", *verify.check_transformers(model, tok, out)))
    elif args.to in ("gguf", "ollama"):
        if args.to == "gguf":
            from berrylm.export.gguf_writer import export_gguf, gguf_file_name

            gguf_file = out / gguf_file_name(model.cfg, dtype)
            print(export_gguf(model, tok, gguf_file, dtype))
        else:
            from berrylm.export.gguf_writer import gguf_file_name
            from berrylm.export.ollama import export_ollama

            print(export_ollama(model, tok, out, dtype, load_generation_config(ckpt)))
            gguf_file = out / gguf_file_name(model.cfg, dtype)
        if args.verify:
            rows.append((f"llama.cpp ({dtype}) vs our f32 model", *verify.check_llama_cpp(model, tok, gguf_file)))
            if dtype != "f32":  # the same quantized weights, with llama.cpp's 8-bit rounding of matmul inputs
                from berrylm.export.gguf_reader import load_gguf

                qmodel, _ = load_gguf(gguf_file, match_llama_cpp=True)
                rows.append((f"llama.cpp ({dtype}) vs our {dtype} weights, llama.cpp rounding",
                             *verify.check_llama_cpp(qmodel, tok, gguf_file)))
    else:
        from berrylm.export.onnx_export import export_onnx

        print(export_onnx(model, tok, out, dtype))
        if args.verify:
            rows.append(("onnxruntime (batch 2, prefill + 16 decode)", *verify.check_onnx(model, tok, out)))
    if rows:
        print(verify.table(rows))
    return 0
