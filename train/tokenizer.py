"""Train the byte-level BPE tokenizer (GPT-2 pre-tokenizer split, our special tokens first)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import SPECIAL_TOKENS, Tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Learn merges from `texts` until the vocabulary (specials + 256 bytes + merges) has vocab_size entries."""
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS) + 256} (specials + bytes)")
    tk = HFTokenizer(models.BPE())
    # use_regex=True is exactly the GPT-2 split, which llama.cpp's `gpt-2` pre-tokenizer reproduces
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk)
