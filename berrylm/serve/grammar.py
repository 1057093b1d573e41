"""Grammar-constrained decoding with llguidance: JSON schemas, regexes, Lark / GBNF grammars, strict tool calls.

    grammar = json_schema_grammar(schema)       # or regex_grammar / lark_grammar / choice_grammar / tool_call_grammar
    check(grammar, tokenizer, token_bytes)      # GrammarError naming what the engine cannot enforce (the API's 400)
    spec = GrammarSpec(grammar)                 # picklable: crosses to the engine process with the request
    guide = spec.make(tokenizer, token_bytes)   # one llguidance matcher per choice, in the engine

Why llguidance (and not xgrammar or outlines-core): berrylm/bench/guide.py measures the per-step cost of the mask
at 16 streams with each engine on our tokenizer (results in berrylm/bench/results/); llguidance also installs as
one small wheel (xgrammar pulls transformers and triton), compiles a schema lazily in well under a millisecond,
and reports the JSON Schema keywords it cannot enforce by name, which become the 400.

Our token-bytes table (serve/detokenizer.py) is the bridge: llguidance sees every token as the bytes it decodes
to, special tokens as 0xFF + their name (its convention), so masks are computed on exactly the bytes the
detokenizer emits. The sampler asks every active guide for its mask before the draw, in one batched call
(`masks = True`, `batch_masks`; serve/sampler.py: grammar_bans). The rest of the interface is serve/json_guide.py's:
allows / allowed_mask / advance / complete. For text the grammar forces (a key, an enum value) llguidance's mask
holds only the canonical tokens of that text.
Generated JSON is compact (", " and ": " separators, no other whitespace), so a model cannot idle in whitespace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance as llg

from berrylm.serve.json_guide import START, step

if TYPE_CHECKING:  # torch is imported where a mask is built (the engine), never by the HTTP process
    import torch

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_executor: llg.LLExecutor | None = None


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce; the message names the feature (the API answers 400)."""


def json_schema_grammar(schema: dict | bool) -> str:
    if schema is True or schema == {}:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, RuntimeError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {str(e)[:300]}") from None


def regex_grammar(pattern: str) -> str:
    return llg.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of the strings."""
    alts = " | ".join(json.dumps(c) for c in choices)
    return llg.LLMatcher.grammar_from_lark(f"start: {alts}\n")


def lark_grammar(text: str) -> str:
    """A Lark grammar in llguidance's dialect, or a llama.cpp GBNF grammar (recognised by its `::=` rules)."""
    if "::=" in text:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises plain Exceptions on bad input
            raise GrammarError(f"invalid GBNF grammar: {str(e)[:300]}") from None
    return llg.LLMatcher.grammar_from_lark(text)


def tool_call_grammar(tools: dict[str, dict | None], open_id: int | None, close_id: int) -> str:
    """`<tool_call>{"name": N, "arguments": ARGS}</tool_call>` for each tool N: ARGS follow the tool's parameter
    schema where one is given (strict tools), else any JSON object. Without open_id the grammar starts after the
    `<tool_call>` token (a guide that a model's own `<tool_call>` triggers)."""
    rules, alts = [], []
    for i, (name, schema) in enumerate(tools.items()):
        head = json.dumps('{"name": ' + json.dumps(name) + ', "arguments": ')
        alts.append(f"{head} args{i} \"}}\"")
        schema = schema if schema is not None else {"type": "object"}
        rules.append(f"args{i}: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}")
    opening = f"<[{open_id}]> " if open_id is not None else ""
    body = "\n".join([f"start: {opening}call <[{close_id}]>", "call: " + " | ".join(alts), *rules])
    return llg.LLMatcher.grammar_from_lark(body)


def ll_tokenizer(tokenizer, token_bytes: list[bytes | None]) -> llg.LLTokenizer:
    """The llguidance view of our tokenizer, built once per tokenizer from its token-bytes table."""
    cached = getattr(tokenizer, "_berry_ll_tokenizer", None)
    if cached is not None:
        return cached

    class _Vocab:  # what llguidance.TokenizerWrapper reads
        eos_token_id = tokenizer.eos_ids[0]
        bos_token_id = None
        tokens = [b if b is not None else b"\xff" + (tokenizer.id_to_token(i) or f"<[{i}]>").encode()
                  for i, b in enumerate(token_bytes)]
        special_token_ids = [i for i, b in enumerate(token_bytes) if b is None]

        def __call__(self, data: bytes) -> list[int]:
            return tokenizer.encode(data.decode("utf-8", errors="replace"))

    lt = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), eos_token=list(tokenizer.eos_ids))
    tokenizer._berry_ll_tokenizer = lt
    return lt


def check(grammar: str, tokenizer, token_bytes: list[bytes | None]) -> None:
    """Raise GrammarError (naming the feature) unless llguidance can enforce the whole grammar."""
    try:
        is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tokenizer, token_bytes))
    except (ValueError, RuntimeError) as e:
        raise GrammarError(str(e)[:300]) from None
    # llguidance reports an unimplemented keyword or unknown format as a warning and would ignore it: refuse it
    if is_error or msgs:
        raise GrammarError("; ".join(m.strip() for m in msgs)[:500] or "invalid grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """A checked grammar, as it crosses to the engine; `make` builds a choice's guide there. trigger: the guide
    is idle until the model writes this token id, then enforces the grammar until it completes (and again at the
    next trigger): a strict tool call in tool_choice "auto". json: the grammar's output is JSON (numbers limited)."""
    grammar: str
    trigger: int | None = None
    json: bool = False

    def make(self, tokenizer, token_bytes: list[bytes | None], max_tokens: int | None = None) -> GrammarGuide:
        return GrammarGuide(ll_tokenizer(tokenizer, token_bytes), self.grammar, self.trigger,
                            token_bytes if self.json else None, max_tokens)


MAX_DIGITS = 16  # digits in a row of a JSON number (integer part, fraction or exponent): a double holds ~16


class _TokenClasses:
    """[V] bool tensors over a vocabulary: tokens starting with a digit, the bare quote, tokens holding a quote,
    tokens closing a container."""

    def __init__(self, token_bytes: list[bytes | None], vocab: int):
        import torch

        pad = lambda xs: torch.nn.functional.pad(torch.tensor(xs, dtype=torch.bool),  # noqa: E731
                                                 (0, max(0, vocab - len(xs))))[:vocab]
        tb = [b or b"" for b in token_bytes]
        self.digit = pad([bool(b) and 48 <= b[0] <= 57 for b in tb])
        self.quote = pad([b == b'"' for b in tb])
        self.has_quote = pad([b'"' in b for b in tb])
        self.closer = pad([b"}" in b or b"]" in b for b in tb])


_CLASSES: dict[tuple[int, int], _TokenClasses] = {}


def _classes(token_bytes: list[bytes | None], vocab: int) -> _TokenClasses:
    key = (id(token_bytes), vocab)
    if key not in _CLASSES:
        _CLASSES[key] = _TokenClasses(token_bytes, vocab)
    return _CLASSES[key]


class GrammarGuide:
    """One choice's constraint: an llguidance matcher, asked for its mask before each draw. The sampler asks a
    guide class with `masks` for the masks of all its rows at once: `batch_masks(guides, vocab)`.

    JSON output (token_bytes given), two limits that keep a small model's JSON finite (the JSON prefix is tracked
    byte by byte with serve/json_guide.py's automaton; each applies only where the grammar allows something else):
      - a number has at most MAX_DIGITS digits in a row: the grammar alone lets a number grow forever, and small
        models fall into exactly that loop ("0.8000000000..." to max_tokens: berry-chat completed 14 of 32
        answers at temperature 1.0 without the limit, 28 with it); past it, digit-led tokens are masked out;
      - in the last `reserve` tokens of max_tokens the guide steers to the end: in a string only the bare quote
        (else any token holding one), in a number no digit, between values a token closing a container; what
        the schema still requires (keys, enums) the grammar forces (the last 4 of those 32: 32 of 32)."""
    masks = True

    def __init__(self, lltok: llg.LLTokenizer, grammar: str, trigger: int | None = None,
                 token_bytes: list[bytes | None] | None = None, max_tokens: int | None = None):
        self.lltok, self.grammar, self.trigger, self.token_bytes = lltok, grammar, trigger, token_bytes
        self.matcher: llg.LLMatcher | None = None
        self.json_state, self.digits, self.n = None, 0, 0
        self.finish_at = None if max_tokens is None else max_tokens - max(8, min(64, max_tokens // 4))
        if trigger is None:
            self._start()

    def _start(self) -> None:
        self.matcher = llg.LLMatcher(self.lltok, self.grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        if self.token_bytes is not None:
            self.json_state, self.digits = START, 0

    def _track(self, token: int) -> None:
        """Follow the JSON text byte by byte: count the digits in a row inside a number."""
        data = self.token_bytes[token] if token < len(self.token_bytes) else None
        for c in data or b"":
            if self.json_state is None:
                return
            self.json_state = step(self.json_state, c, top_level_object=False)
            in_number = self.json_state is not None and self.json_state[1] == "N"
            self.digits = self.digits + 1 if in_number and 48 <= c <= 57 else 0

    @property
    def active(self) -> bool:
        return self.matcher is not None

    @property
    def complete(self) -> bool:
        return self.matcher is None or self.matcher.is_accepting()

    def allows(self, token: int) -> bool:
        if self.matcher is None:
            return True
        return self.matcher.validate_tokens([token]) == 1

    def allowed_mask(self, vocab: int, device=None) -> torch.Tensor:
        import torch

        if self.matcher is None:
            return torch.ones(vocab, dtype=torch.bool, device=device)
        return unpack(torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)[None],
                      vocab)[0].to(device)

    def steer(self, allowed: torch.Tensor) -> torch.Tensor:
        """The JSON limits (see the class docstring) applied to the grammar's [V] allowed mask."""
        c = _classes(self.token_bytes, allowed.shape[0])
        prefer = None
        if self.finish_at is not None and self.n >= self.finish_at:
            mode = self.json_state[1] if self.json_state is not None else ""
            if mode in ("S", "E", "U"):
                prefer = c.quote if bool((allowed & c.quote).any()) else c.has_quote
            elif mode == "N":
                prefer = ~c.digit
            else:
                prefer = c.closer
        elif self.digits >= MAX_DIGITS:
            prefer = ~c.digit
        if prefer is not None and bool((allowed & prefer).any()):
            return allowed & prefer
        return allowed

    def advance(self, token: int) -> None:
        self.n += 1
        if self.matcher is None:
            if token == self.trigger:
                self._start()
            return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the sampled token {token} breaks the grammar: {self.matcher.get_error()}")
        if self.json_state is not None:
            self._track(token)
        if self.trigger is not None and self.matcher.is_stopped():
            self.matcher = None  # the call is complete: free text again until the next trigger


    @staticmethod
    def batch_masks(guides: list[GrammarGuide], vocab: int) -> torch.Tensor:
        return allowed_masks(guides, vocab)


def _exec() -> llg.LLExecutor:
    global _executor
    if _executor is None:
        _executor = llg.LLExecutor(max(1, min(4, os.cpu_count() or 1)))
    return _executor


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, ceil(V/32)] int32 bitmask -> [n, vocab] bool allowed (ids past the tokenizer's vocabulary: False)."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))


def allowed_masks(guides: list[GrammarGuide], vocab: int) -> torch.Tensor:
    """[n, vocab] bool: each active guide's allowed tokens, computed in parallel (llguidance's executor, off
    the GIL); rows of idle guides allow everything."""
    import torch

    n_words = (guides[0].lltok.vocab_size + 31) // 32
    bitmask = torch.full((len(guides), n_words), -1, dtype=torch.int32)
    active = [(g.matcher, i) for i, g in enumerate(guides) if g.matcher is not None]
    if len(active) >= 4 and (os.cpu_count() or 1) >= 4:
        _exec().unsafe_compute_mask_ptr(active, bitmask.data_ptr(), n_words * 4, len(guides))
    else:  # on 2 cores the executor's threads cost more than they save (bench/guide.py: 0.24 vs 0.14 ms at 16)
        for m, i in active:
            m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), n_words * 4)
    out = unpack(bitmask, vocab)
    for i, g in enumerate(guides):
        if g.matcher is None:
            out[i] = True
        elif g.json_state is not None:
            out[i] = g.steer(out[i])
    return out
