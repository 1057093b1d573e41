"""Token-level JSON constraint for response_format json_object: a byte-level JSON prefix validator.

`JsonGuide.allows(token)` says whether appending the token's bytes keeps the output a prefix of one JSON
object (RFC 8259 grammar, top level must be an object); EOS is allowed only once the object is complete,
and once it is complete only EOS is. The sampler draws, checks, and redraws with the token masked, so the
usual cost is one check per step. The parser state is an immutable tuple, so a check never mutates it.

State: (stack, mode, sub). stack: open containers, e.g. "{[". mode:
  V  value            A  value or ']'        O  key or '}'       K  key         C  ':'
  X  ',' or close     S  string (sub=True for a key)            E  after '\\'    U  \\uXXXX (sub = hex left)
  N  number (sub = number state)            L  literal (sub = rest of true/false/null)   D  done
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
NUM_END_OK = {"zero", "int", "frac", "exp"}

State = tuple[str, str, object]
START: State = ("", "V", None)


def _after_value(stack: str) -> State:
    return (stack, "X", None) if stack else ("", "D", None)


def _num(sub: str, c: int) -> str | None:
    """Next state of the number automaton -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? or None if c does not continue it."""
    d = c in DIGITS
    if sub == "minus":
        return "zero" if c == ord("0") else "int" if d else None
    if sub in ("zero", "int"):
        if sub == "int" and d:
            return "int"
        return "dot" if c == ord(".") else "e" if c in b"eE" else None
    if sub in ("dot", "frac"):
        return "frac" if d else ("e" if sub == "frac" and c in b"eE" else None)
    if sub == "e":
        return "esign" if c in b"+-" else "exp" if d else None
    if sub in ("esign", "exp"):
        return "exp" if d else None
    return None


def _value_start(stack: str, c: int, top_level_object: bool) -> State | None:
    if not stack and top_level_object and c != ord("{"):
        return None
    if c == ord("{"):
        return (stack + "{", "O", None)
    if c == ord("["):
        return (stack + "[", "A", None)
    if c == ord('"'):
        return (stack, "S", False)
    if c == ord("-"):
        return (stack, "N", "minus")
    if c in DIGITS:
        return (stack, "N", "zero" if c == ord("0") else "int")
    if c in LITERALS:
        return (stack, "L", LITERALS[c])
    return None


def step(state: State, c: int, top_level_object: bool = True) -> State | None:
    """Feed one byte; None if it cannot continue a valid JSON prefix."""
    stack, mode, sub = state
    if mode == "S":
        if c == ord('"'):
            return (stack, "C", None) if sub else _after_value(stack)
        if c == ord("\\"):
            return (stack, "E", sub)
        return None if c < 0x20 else state
    if mode == "E":
        if c == ord("u"):
            return (stack, "U", (sub, 4))
        return (stack, "S", sub) if c in b'"\\/bfnrt' else None
    if mode == "U":
        is_key, left = sub
        if c not in HEX:
            return None
        return (stack, "S", is_key) if left == 1 else (stack, "U", (is_key, left - 1))
    if mode == "N":
        nxt = _num(sub, c)
        if nxt is not None:
            return (stack, "N", nxt)
        if sub not in NUM_END_OK:
            return None
        return step(_after_value(stack), c, top_level_object)  # the number ended; c belongs to what follows
    if mode == "L":
        if c != sub[0]:
            return None
        return (stack, "L", sub[1:]) if len(sub) > 1 else _after_value(stack)
    if c in WS:
        return None if mode == "D" else state
    if mode == "V":
        return _value_start(stack, c, top_level_object)
    if mode == "A":
        if c == ord("]"):
            return _after_value(stack[:-1])
        return _value_start(stack, c, top_level_object)
    if mode in ("O", "K"):
        if c == ord('"'):
            return (stack, "S", True)
        if mode == "O" and c == ord("}"):
            return _after_value(stack[:-1])
        return None
    if mode == "C":
        return (stack, "V", None) if c == ord(":") else None
    if mode == "X":
        top = stack[-1]
        if c == ord(","):
            return (stack, "K" if top == "{" else "V", None)
        if c == ord("}" if top == "{" else "]"):
            return _after_value(stack[:-1])
        return None
    return None  # D: nothing after the object


def feed(state: State | None, data: bytes, top_level_object: bool = True) -> State | None:
    for c in data:
        if state is None:
            return None
        state = step(state, c, top_level_object)
    return state


def is_complete(state: State | None) -> bool:
    return state is not None and (state[1] == "D" or (state[1] == "N" and not state[0] and state[2] in NUM_END_OK))


class JsonGuide:
    """Per-sequence JSON constraint. token_bytes: bytes of every token id (None for special tokens)."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: list[int]):
        self.token_bytes, self.eos = token_bytes, set(eos_ids)
        self.state: State | None = START

    @property
    def complete(self) -> bool:
        return is_complete(self.state)

    def allows(self, token: int) -> bool:
        if token in self.eos:
            return self.complete
        data = self.token_bytes[token] if token < len(self.token_bytes) else None
        if not data:
            return False
        return feed(self.state, data) is not None

    def allowed_mask(self, vocab: int, device=None) -> torch.Tensor:
        """[V] bool of every allowed token (a full scan; the sampler's fallback only)."""
        import torch  # here, not at the top: the HTTP process builds guides without torch

        return torch.tensor([self.allows(i) for i in range(vocab)], dtype=torch.bool, device=device)

    def advance(self, token: int) -> None:
        if token not in self.eos:
            self.state = feed(self.state, self.token_bytes[token] or b"")
