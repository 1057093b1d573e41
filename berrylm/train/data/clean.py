"""Normalise documents and drop the ones that are not prose worth training on."""

from __future__ import annotations

import re
import unicodedata

from berrylm.model.tokenizer import SPECIAL_TOKENS

MIN_CHARS = 40


def clean_text(text: str) -> str:
    """NFC unicode, unified newlines, no control characters or special-token strings, collapsed spaces and
    blank-line runs."""
    for tok in SPECIAL_TOKENS:  # literal "<|endoftext|>" etc. in a text would become control tokens
        text = text.replace(tok, "")
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def keep(text: str, min_chars: int = MIN_CHARS) -> bool:
    """Enough characters, mostly letters, not a wall of symbols or numbers."""
    if len(text) < min_chars:
        return False
    letters = sum(c.isalpha() for c in text)
    return letters / len(text) > 0.5


def split_long(text: str, max_chars: int = 20000) -> list[str]:
    """Cut very long documents at paragraph breaks so near-dup detection and val split work per piece."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        if size + len(para) > max_chars and cur:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces
