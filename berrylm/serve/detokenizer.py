"""Incremental, UTF-8 safe detokenization with stop strings that never leak into streamed text.

The tokenizer is byte-level BPE, so every token is a byte string (GPT-2's byte<->unicode map). We feed
those bytes to an incremental UTF-8 decoder: a character split across tokens is emitted once complete.
Stop strings: the text that could still be the start of a stop string is held back until the next
token decides; when a stop string appears the text before it is the final text.
"""

from __future__ import annotations

import codecs
from functools import lru_cache


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes_table(tokenizer) -> list[bytes | None]:
    """bytes of every token id; None for special tokens (their text comes from `special_text`)."""
    cached = getattr(tokenizer, "_berry_token_bytes", None)
    if cached is not None:
        return cached
    u2b = _unicode_to_byte()
    special = set(tokenizer.special_ids.values())
    table: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        s = tokenizer.id_to_token(i)
        if i in special or s is None:
            table.append(None)
        else:
            table.append(bytes(u2b[ch] for ch in s) if all(ch in u2b for ch in s) else s.encode())
    tokenizer._berry_token_bytes = table
    return table


class Detokenizer:
    """Feed token ids, get the new text that is safe to show (held back: partial UTF-8, stop prefixes)."""

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special: bool = True):
        self.table = token_bytes_table(tokenizer)
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.stop = [s for s in (stop or []) if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.sent = 0  # chars of self.text already returned
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, token: int) -> str:
        data = self.table[token] if token < len(self.table) else None
        if data is None:
            return "" if self.skip_special else self.utf8.decode(b"", final=True) + self.tokenizer.id_to_token(token)
        return self.utf8.decode(data)

    def add(self, token: int) -> str:
        """Append one token; return the newly releasable text ('' while held back)."""
        if self.stopped is not None:
            return ""
        self.text += self._decode(token)
        if self.stop:
            lo = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, lo)) >= 0]
            if hits:
                i, s = min(hits)
                self.stopped = s
                self.text = self.text[:i]
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held())
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of generation: release what was held back (it did not become a stop string)."""
        if self.stopped is None:
            self.text += self.utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
