"""The training loop shared by pretraining and SFT.

    data.get(step, micro) -> (x [mb, T], y [mb, T])   y = -1 where no loss (SFT masks)
    one optimizer step = `accum` micro-batches (batch_tokens / (micro_batch * seq_len)), split across DDP ranks
    loss = cross-entropy (+ aux_loss_coef * mini-expert balance loss for the hybrid)

Everything that decides the future of a run is in the checkpoint: weights, optimizer state, the step (which
fixes the LR and, through the data's seeding, every later batch). `--resume` therefore continues exactly
where the killed run would have gone. Checkpoints go through model.checkpoint.save_checkpoint (atomic).
RUN_DIR holds `checkpoint/` (latest), `log.jsonl` (one JSON object per logged step / eval) and `report.md`.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from berrylm.model.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from berrylm.model.config import PRESETS, ModelConfig
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer
from berrylm.train.optim import build_optimizers, lr_at, set_lr
from berrylm.train.run_config import TrainConfig

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU worker (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def model_flops_utilization(model: Transformer, tok_per_s: float, seq_len: int, device: torch.device,
                            world: int = 1) -> float | None:
    """Achieved / peak bf16 FLOPs on a known CUDA GPU (6N per token + attention), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    c = model.cfg
    flops_per_token = 6 * model.num_params() + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
    return tok_per_s * flops_per_token / (peak * world) if peak else None


def get_rng_state() -> dict:
    """torch (CPU, CUDA), numpy and python RNG states as tensors and lists (loadable with weights_only=True).
    Batches do not depend on them (they are seeded by step), but anything random in a model or sampler does."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(py_state), py_gauss]}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = s["python"]
    random.setstate((version, tuple(py_state), py_gauss))


class Trainer:
    def __init__(self, cfg: TrainConfig, data, tokenizer: Tokenizer | None = None, data_stats: dict | None = None):
        self.cfg, self.data, self.data_stats = cfg, data, data_stats or {}
        self.rank, self.world, self.device = setup_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.ckpt = self.out / "checkpoint"
        tokens_per_micro = cfg.micro_batch * cfg.seq_len
        self.accum = max(1, cfg.batch_tokens // tokens_per_micro)
        if self.accum % self.world:
            raise ValueError(f"{self.accum} micro-batches per step do not split across {self.world} processes")
        self.total_steps = cfg.steps or max(1, cfg.max_tokens // (self.accum * tokens_per_micro))
        resuming = self.ckpt.exists() and cfg.resume
        if self.ckpt.exists() and not cfg.resume:
            raise ValueError(f"{self.ckpt} exists: pass --resume to continue it, or choose another --out")
        torch.manual_seed(cfg.seed)
        if resuming or cfg.init_from:
            model, tok = load_checkpoint(self.ckpt if resuming else cfg.init_from, device=self.device,
                                         dtype=torch.float32)
            self.tokenizer = tokenizer or tok
        else:
            if cfg.preset not in PRESETS:
                raise ValueError(f"unknown preset '{cfg.preset}' (choose from {', '.join(PRESETS)})")
            mcfg = ModelConfig(**{**asdict(PRESETS[cfg.preset]), "vocab_size": data.vocab_size, **cfg.overrides})
            model = Transformer(mcfg).to(self.device)
            self.tokenizer = tokenizer
        if model.cfg.vocab_size < data.vocab_size:
            raise ValueError(f"model vocab {model.cfg.vocab_size} < data vocab {data.vocab_size}")
        self.model = model.train()
        self.opts = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.muon_lr)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if resuming:
            state = load_train_state(self.ckpt)
            if state is None:
                raise ValueError(f"{self.ckpt} has no training state to resume from")
            for opt, s in zip(self.opts, state["optimizers"]):
                opt.load_state_dict(s)
            self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
            if "rng" in state:
                set_rng_state(state["rng"])
        self.fwd = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.fwd = DistributedDataParallel(model)
        if cfg.compile:
            self.fwd = torch.compile(self.fwd)
        self.log_path = self.out / "log.jsonl"
        self.samples: list[str] = []
        self.last_eval: dict = {}

    # --- one optimizer step ---
    def train_step(self) -> float:
        cfg, model = self.cfg, self.model
        set_lr(self.opts, lr_at(self.step, self.total_steps, cfg.warmup, cfg.min_lr_frac, cfg.decay))
        mine = [m for m in range(self.accum) if m % self.world == self.rank]
        total = torch.zeros((), device=self.device)
        for i, m in enumerate(mine):
            x, y = (t.to(self.device) for t in self.data.get(self.step, m))
            sync = i == len(mine) - 1 or self.world == 1
            ctx = self.fwd.no_sync() if (self.world > 1 and not sync) else _null()
            with ctx, torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.fwd(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
                aux = model.aux_loss * model.cfg.aux_loss_coef if model.cfg.n_experts else 0.0
            ((loss + aux) / len(mine)).backward()
            total += loss.detach() / self.accum
            self.tokens_seen += int((y >= 0).sum()) * self.world
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return float(total)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses, n = 0.0, 0
        for x, y in self.data.val_batches(self.cfg.val_tokens):
            logits = self.model(x.to(self.device))
            y = y.to(self.device)
            losses += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum"))
            n += int((y >= 0).sum())
        self.model.train()
        val_loss = losses / max(1, n)
        bpt = getattr(self.data, "bytes_per_token", lambda: None)()
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bpt if bpt else None}

    def save(self) -> None:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                 "optimizers": [o.state_dict() for o in self.opts], "train_config": json.dumps(asdict(self.cfg)),
                 "rng": get_rng_state()}
        save_checkpoint(self.ckpt, self.model, self.tokenizer, train_state=state)

    def log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """After a resume, drop log lines from beyond the checkpoint (the killed run's lost steps)."""
        if not self.log_path.exists():
            return
        keep = [ln for ln in self.log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        self.log_path.write_text("".join(ln + "\n" for ln in keep))

    def mfu(self, tok_per_s: float) -> float | None:
        return model_flops_utilization(self.model, tok_per_s, self.cfg.seq_len, self.device, self.world)

    def run(self) -> dict:
        from berrylm.train.generate import sample_text
        from berrylm.train.report import pyplot, write_report

        pyplot()  # without matplotlib, fail now rather than after training

        cfg, lead = self.cfg, self.rank == 0
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log() if self.step else self.log_path.unlink(missing_ok=True)
            n = self.model.num_params()
            print(f"[{cfg.kind}] {self.model.cfg.name} {n / 1e6:.2f}M params, {self.total_steps} steps x "
                  f"{self.accum * cfg.micro_batch * cfg.seq_len} tokens, world {self.world}, {self.device}"
                  + (f", resuming at step {self.step}" if self.step else ""), flush=True)
        tty = sys.stdout.isatty()
        window_t, window_tok = time.time(), self.tokens_seen
        while self.step < self.total_steps:
            t0 = time.time()
            loss = self.train_step()
            self.elapsed += time.time() - t0
            last = self.step == self.total_steps
            if not lead:
                continue
            if self.step % cfg.log_every == 0 or last:
                dt = time.time() - window_t
                tps = (self.tokens_seen - window_tok) / max(dt, 1e-9)
                window_t, window_tok = time.time(), self.tokens_seen
                lr = self.opts[0].param_groups[0]["lr"]
                eta = (self.total_steps - self.step) * self.elapsed / max(1, self.step) if self.step else 0
                mfu = self.mfu(tps)
                rec = {"step": self.step, "loss": loss, "lr": lr, "tok_per_s": tps, "tokens": self.tokens_seen}
                if mfu is not None:
                    rec["mfu"] = mfu
                self.log(rec)
                line = (f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
                        f"ETA {_hms(eta)}" + (f" MFU {mfu:.1%}" if mfu is not None else ""))
                print(("\r" + line + "   ") if tty else line, end="" if tty and not last else "\n", flush=True)
            if self.step % cfg.eval_every == 0 or last:
                self.last_eval = {"step": self.step, **self.evaluate()}
                self.log(self.last_eval)
                bpb = self.last_eval["val_bpb"]
                print(f"\neval step {self.step}: val loss {self.last_eval['val_loss']:.4f}"
                      + (f", bpb {bpb:.4f}" if bpb else ""), flush=True)
            if cfg.kind == "pretrain" and (self.step % cfg.sample_every == 0 or last) and self.tokenizer:
                self.model.eval()
                self.samples = [sample_text(self.model, self.tokenizer, p) for p in SAMPLE_PROMPTS]
                self.model.train()
                self.log({"step": self.step, "samples": self.samples})
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
            if self.step % cfg.eval_every == 0 or last:
                write_report(self)
        if self.world > 1:
            import torch.distributed as dist

            # Workers wait for rank 0's last eval/save: a gloo peer that tears down while rank 0 still
            # holds the connection can abort ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()
        return self.last_eval


SAMPLE_PROMPTS = ["The meaning of the word", "Once upon a time", "In the beginning", "Python is"]


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
