"""Train the byte-level BPE tokenizer (GPT-2 pre-tokenizer split, our special tokens first).

By default no merge may produce a token that contains a digit: every number is spelled one digit per token
(" 1234" -> "Ġ", "1", "2", "3", "4"). A tiny model then copies operands into a calculator call and the
result back into its answer digit by digit, the same way wherever the number stands, instead of having to
learn that " 1234" and "1234" are different multi-digit tokens. It is still plain BPE: llama.cpp's `gpt-2`
pre-tokenizer and transformers reproduce the ids from the stored merges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from berrylm.model.tokenizer import SPECIAL_TOKENS, Tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, split_digits: bool = True) -> Tokenizer:
    """Learn merges from `texts` until the vocabulary (specials + 256 bytes + merges) has vocab_size entries."""
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base + 1:
        raise ValueError(f"vocab_size must be > {base} (specials + bytes)")
    texts = list(texts) if split_digits else texts
    # digit merges are dropped afterwards, so ask for more than needed and trim back to vocab_size
    target = vocab_size + (vocab_size - base) // 3 if split_digits else vocab_size
    tk = HFTokenizer(models.BPE())
    # use_regex=True is exactly the GPT-2 split, which llama.cpp's `gpt-2` pre-tokenizer reproduces
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    if split_digits:
        tk = _drop_digit_merges(tk, vocab_size)
    return Tokenizer(tk)


def _drop_digit_merges(tk: HFTokenizer, vocab_size: int) -> HFTokenizer:
    """Remove every merge whose result contains a digit, renumber ids densely, keep the first vocab_size."""
    spec = json.loads(tk.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in spec["model"]["merges"]]
    keep = [(a, b) for a, b in merges if not any(c.isdigit() for c in a + b)]
    by_id = sorted(vocab, key=vocab.get)
    merged = {a + b for a, b in merges}
    tokens = [t for t in by_id if t not in merged]  # specials + byte alphabet, in their original order
    keep = keep[: vocab_size - len(tokens)]
    tokens += [a + b for a, b in keep]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["model"]["merges"] = [[a, b] for a, b in keep]
    for added in spec.get("added_tokens", []):
        added["id"] = spec["model"]["vocab"][added["content"]]
    return HFTokenizer.from_str(json.dumps(spec))
