"""`berry train tokenizer|pretrain|sft` and `berry eval`."""

from __future__ import annotations

import argparse
import shlex
import sys

from berrylm.train.run_config import TrainConfig


def _loop_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint/, log.jsonl, report.md)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: from --max-tokens)")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per optimizer step")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--muon-lr", type=float, default=d.muon_lr)
    p.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--decay", choices=["cosine", "linear", "constant"], default=d.decay)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=d.optimizer)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--val-tokens", type=int, default=d.val_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint exactly")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a tokenizer, pretrain, or fine-tune on chat data")
    tsub = p.add_subparsers(dest="train_command", metavar="STAGE", required=True)

    t = tsub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", required=True, help="corpus dir (docs.train.jsonl) or .txt/.jsonl files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-bytes", type=int, default=200_000_000, help="train on at most this much text")
    t.add_argument("--keep-digit-merges", action="store_true", help="allow multi-digit tokens")
    t.add_argument("--out", required=True)
    t.set_defaults(func=run_tokenizer)

    d = TrainConfig(out="")
    pt = tsub.add_parser("pretrain", help="pretrain on token shards (berry data tokenize)")
    pt.add_argument("--data", required=True, help="shard dir with train.bin, val.bin, meta.json")
    pt.add_argument("--preset", default=d.preset)
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override")
    _loop_args(pt, d)
    pt.set_defaults(func=run_pretrain)

    s = tsub.add_parser("sft", help="fine-tune on chat data (OpenAI messages JSONL); loss on assistant tokens")
    s.add_argument("--data", required=True, help="comma list of JSONL files")
    s.add_argument("--val-fraction", type=float, default=0.02)
    s.add_argument("--epochs", type=float, default=1.0, help="passes over the data (when no --steps/--max-tokens)")
    _loop_args(s, TrainConfig(out="", lr=1e-3, warmup=20, eval_every=100, kind="sft"))
    s.set_defaults(func=run_sft)

    e = sub.add_parser("eval", help="evaluate a model: val bits-per-byte, calculator tool-use accuracy")
    e.add_argument("model", help="checkpoint dir, embedded model name, GGUF file or HF llama dir")
    e.add_argument("--bpb", metavar="SHARDS", help="val bits-per-byte on a shard dir's val.bin")
    e.add_argument("--text", metavar="FILE", help="perplexity and bits-per-byte on a UTF-8 text file (any tokenizer)")
    e.add_argument("--max-tokens", type=int, default=16384, help="--text: evaluate at most this many tokens")
    e.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: evaluate the quantized inference path AND the float one, print both with greedy "
                        "agreement, and fail (exit 1) when bpb is more than 1%% worse or tool accuracy more than "
                        "0.5 points lower (the quality guard)")
    e.add_argument("--tool-accuracy", metavar="HELDOUT", help="held-out arithmetic JSONL (berry data chat --heldout)")
    e.add_argument("--choices", metavar="JSONL", help="multiple-choice accuracy by log-likelihood, as lm-eval scores "
                   "it (records {question, choices, answer}; e.g. berrylm/train/evals/berry_arith/berry_arith.jsonl)")
    e.add_argument("--limit", type=int, default=0, help="evaluate at most this many records")
    e.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for token-by-token decoding; 0: torch's choice)")
    e.set_defaults(func=run_eval)


def _config(args: argparse.Namespace, kind: str, **extra) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    kw = {k: v for k, v in vars(args).items() if k in fields and k not in ("kind", "command")}
    return TrainConfig(**kw, kind=kind, command="berry " + " ".join(shlex.quote(a) for a in sys.argv[1:]), **extra)


def _overrides(items: list[str]) -> dict:
    import json

    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set {it}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def run_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from berrylm.train.data.shards import read_jsonl
    from berrylm.train.data.tokenizer import train_bpe

    def texts():
        budget = args.max_bytes
        paths = [Path(args.data) / "docs.train.jsonl"] if Path(args.data).is_dir() else \
            [Path(p) for p in args.data.split(",")]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"{path}: not found")
            rows = read_jsonl(path) if path.suffix == ".jsonl" else [{"text": path.read_text(encoding="utf-8")}]
            for d in rows:
                if budget <= 0:
                    return
                budget -= len(d["text"].encode())
                yield d["text"]

    tok = train_bpe(texts(), args.vocab_size, split_digits=not args.keep_digit_merges)
    tok.save(args.out)
    print(f"tokenizer: {tok.tk.get_vocab_size()} tokens -> {args.out}/tokenizer.json")
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from berrylm.model.tokenizer import Tokenizer
    from berrylm.train.pretrain import ShardBatches
    from berrylm.train.trainer import Trainer

    if args.steps <= 0 and args.max_tokens <= 0:
        raise ValueError("give the run's length: --steps N or --max-tokens N")
    data = ShardBatches(args.data, args.seq_len, args.micro_batch, args.seed)
    tok = Tokenizer.load(data.meta["tokenizer"])
    cfg = _config(args, "pretrain", overrides=_overrides(args.set))
    stats = {k: data.meta[k] for k in ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "sources")}
    Trainer(cfg, data, tok, stats).run()
    return 0


def run_sft(args: argparse.Namespace) -> int:
    from berrylm.train.sft import run_sft as _run

    return _run(args, _config(args, "sft"))


def run_eval(args: argparse.Namespace) -> int:
    from berrylm.train.eval import run_eval as _run

    return _run(args)
