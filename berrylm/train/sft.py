"""Chat SFT: OpenAI `messages` JSONL -> packed rows with loss only on the assistant's tokens.

A record may instead be plain text, {"text": "..."} (e.g. `berry data chat --kind text`): it is trained on every
token, as in pretraining, cut into pieces of at most seq_len + 1 tokens. Mixed into chat data it limits how much
general text ability SFT forgets.

Masking is exact because it is built from the template itself: for assistant message i the tokens between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) are the assistant's (its content,
its tool-call text and the closing <|im_end|>); system, user and tool turns and the `<|im_start|>assistant\n`
header get no loss. Conversations are packed whole into rows of seq_len + 1 tokens (padding fills the rest and
is masked); each epoch visits the rows in a fresh order drawn from (seed, epoch), so a batch is a function of
its step and resume stays exact.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from berrylm.model.tokenizer import Tokenizer


def encode_with_mask(tok: Tokenizer, messages: list[dict],
                     tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """ids of the whole conversation and, per id, whether the model is trained to produce it."""
    ids = tok.encode_chat(messages, tools)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.encode_chat(messages[:i], tools, add_generation_prompt=True))
        end = len(tok.encode_chat(messages[: i + 1], tools))
        if ids[end - 1] != tok.im_end_id:  # the newline after <|im_end|> is the template's, not the model's
            end -= 1
        for j in range(start, end):
            mask[j] = True
    return ids, mask


def encode_text(tok: Tokenizer, text: str, row_len: int) -> list[tuple[list[int], list[bool]]]:
    """A plain-text document as pieces of at most row_len tokens, each trained on every token."""
    ids = tok.encode(text) + [tok.endoftext_id]
    return [(ids[i: i + row_len], [True] * len(ids[i: i + row_len])) for i in range(0, len(ids), row_len)]


def pack(examples: list[tuple[list[int], list[bool]]], row_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy first-fit into rows of row_len tokens. Returns tokens [R, row_len] and targets-mask [R, row_len]."""
    rows, masks, cur, cur_m = [], [], [], []
    for ids, m in examples:
        ids, m = ids[:row_len], m[:row_len]
        if len(cur) + len(ids) > row_len:
            rows.append(cur + [pad_id] * (row_len - len(cur)))
            masks.append(cur_m + [False] * (row_len - len(cur_m)))
            cur, cur_m = [], []
        cur, cur_m = cur + ids, cur_m + m
    if cur:
        rows.append(cur + [pad_id] * (row_len - len(cur)))
        masks.append(cur_m + [False] * (row_len - len(cur_m)))
    return np.array(rows, dtype=np.int64), np.array(masks, dtype=bool)


class ChatBatches:
    def __init__(self, files: list[str], tok: Tokenizer, seq_len: int, micro_batch: int, seed: int = 0,
                 val_fraction: float = 0.02):
        convos = []
        for f in files:
            for n, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    convos.append(rec["text"] if isinstance(rec.get("text"), str) else
                                  (rec["messages"], rec.get("tools")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ValueError(f"{f}:{n + 1}: expected a JSON object with \"messages\" or \"text\"") from None
        if not convos:
            raise ValueError("no conversations in " + ", ".join(files))
        random.Random(seed).shuffle(convos)
        n_val = max(1, int(len(convos) * val_fraction))
        def encode(c) -> list[tuple[list[int], list[bool]]]:
            return encode_text(tok, c, seq_len + 1) if isinstance(c, str) else [encode_with_mask(tok, *c)]

        val = [e for c in convos[:n_val] for e in encode(c) if any(e[1])]
        train = [e for c in convos[n_val:] for e in encode(c) if any(e[1])]
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.vocab_size = tok.tk.get_vocab_size()
        self.rows, self.masks = pack(train, seq_len + 1, tok.endoftext_id)
        self.val_rows, self.val_masks = pack(val, seq_len + 1, tok.endoftext_id)
        n_text = sum(isinstance(c, str) for c in convos)
        self.stats = {"conversations": len(convos) - n_text, "text_documents": n_text,
                      "train_rows": len(self.rows), "val_rows": len(self.val_rows),
                      "train_tokens": int(self.rows.size), "train_loss_tokens": int(self.masks.sum()),
                      "files": files}

    def _xy(self, rows: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(np.where(masks[:, 1:], rows[:, 1:], -1))
        return x, y

    def get(self, step: int, micro: int, accum: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        per_step = self.micro_batch * (accum or self.accum)
        start = (step * per_step + micro * self.micro_batch)
        epoch = start // len(self.rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        idx = [order[(start + i) % len(self.rows)] for i in range(self.micro_batch)]
        return self._xy(self.rows[idx], self.masks[idx])

    def val_batches(self, max_tokens: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.micro_batch
        return [self._xy(self.val_rows[i: i + mb], self.val_masks[i: i + mb])
                for i in range(0, len(self.val_rows), mb)]


def run_sft(args: argparse.Namespace, cfg) -> int:
    from berrylm.model.checkpoint import load_tokenizer, resolve
    from berrylm.train.trainer import Trainer

    if not cfg.init_from and not (Path(cfg.out) / "checkpoint").exists():
        raise ValueError("sft needs --init-from CHECKPOINT (a pretrained model)")
    src = Path(cfg.out) / "checkpoint" if cfg.resume and (Path(cfg.out) / "checkpoint").exists() else resolve(
        cfg.init_from)
    tok = load_tokenizer(src)
    data = ChatBatches(args.data.split(","), tok, cfg.seq_len, cfg.micro_batch, cfg.seed, args.val_fraction)
    trainer = Trainer(cfg, data, tok, data.stats)
    data.accum = trainer.accum
    if not cfg.steps and not cfg.max_tokens:
        epoch_steps = max(1, len(data.rows) // (cfg.micro_batch * trainer.accum))
        trainer.total_steps = max(1, round(args.epochs * epoch_steps))
    trainer.run()
    return 0
