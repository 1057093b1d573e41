"""OpenAI `tools` for client-defined functions: tool_choice, the constrained call for required/named, and
turning the model's `<tool_call>{...}</tool_call>` text into `message.tool_calls` / streamed `delta.tool_calls`.

    tool_choice  "auto" (default)   tools rendered in the prompt, calls parsed from the output
                 "none"             tools not rendered, nothing parsed
                 "required" / {"type": "function", "function": {"name": N}}
                                    decoding is constrained (ToolCallGuide) to exactly one call:
                                    <tool_call>{"name": "N", "arguments": <JSON object>}</tool_call> then EOS
    parallel_tool_calls=false       generation stops at the first </tool_call>

Streaming: when a call is complete, a chunk with {index, id, type, function: {name, arguments: ""}}, then one
with its arguments {index, function: {arguments}} (the official client accumulates them).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from berrylm.model.toolcall import ToolCallParser
from berrylm.serve.detokenizer import Detokenizer
from berrylm.serve.json_guide import NUM_END_OK, START, WS, _after_value, is_complete, step
from berrylm.serve.tools.builtin import new_call_id

if TYPE_CHECKING:
    import torch


# --- request validation ---
def tool_names(tools: list[dict]) -> list[str]:
    names = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        names.append(f["name"])
    return names


def resolve_tool_choice(choice, tools: list[dict] | None) -> tuple[str, list[str]]:
    """-> (mode, names): mode "none" | "auto" | "forced"; names the functions a forced call may name."""
    names = tool_names(tools or [])
    if choice is None:
        return ("auto" if names else "none"), names
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, not '{choice}'")
        if choice == "none" or (choice == "auto" and not names):
            return "none", names
        if not names:
            raise ValueError("tool_choice 'required' needs tools")
        return ("forced" if choice == "required" else "auto"), names
    f = choice.get("function") if isinstance(choice, dict) else None
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice must look like {"type": "function", "function": {"name": "..."}}')
    if name not in names:
        raise ValueError(f"tool_choice names '{name}', which is not in tools")
    return "forced", [name]


# --- constrained decoding ---
def _closer(st) -> int:
    """A byte that moves JSON prefix state `st` towards completion by the shortest path."""
    stack, mode, sub = st
    if mode in ("S", "E", "K"):
        return ord('"')
    if mode == "U":
        return ord("0")
    if mode == "N":
        return _closer(_after_value(stack)) if sub in NUM_END_OK else ord("0")
    if mode == "L":
        return sub[0]
    if mode == "V":
        return ord("0") if stack else ord("{")
    if mode in ("A", "O", "X"):
        return ord("]") if (mode == "A" or (mode == "X" and stack[-1] == "[")) else ord("}")
    return ord(":")  # C


def json_close_len(st) -> int:
    n = 0
    while not is_complete(st) and n < 100000:
        st = step(st, _closer(st))
        n += 1
    return n


class ToolCallGuide:
    """Forces <tool_call>{"name": <one of names>, "arguments": <JSON object>}</tool_call> then EOS, within
    max_tokens: once the budget gets tight only tokens on the shortest way to a complete call are allowed."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: list[int], names: list[str], max_tokens: int,
                 open_id: int = 3, close_id: int = 4):
        self.token_bytes, self.eos, self.open_id, self.close_id = token_bytes, set(eos_ids), open_id, close_id
        self.heads = tuple(('{"name": ' + json.dumps(n) + ', "arguments": ').encode() for n in names)
        self.max_tokens, self.n = max_tokens, 0
        self.state = ("open", None)

    def _feed(self, st, data: bytes):
        for c in data:
            phase, x = st
            if phase == "head":
                cands, pos = x
                cands = tuple(h for h in cands if h[pos] == c)
                if not cands:
                    return None
                done = [h for h in cands if len(h) == pos + 1]
                st = ("args", START) if done else ("head", (cands, pos + 1))
            elif phase == "args":
                if c in WS and x[1] not in ("S", "E", "U"):
                    return None  # compact JSON: whitespace only inside strings
                if is_complete(x):
                    st = ("close", None) if c == ord("}") else None
                else:
                    nx = step(x, c)
                    st = None if nx is None else ("args", nx)
            else:
                return None  # "open", "close" and "end" take special tokens only
            if st is None:
                return None
        return st

    @staticmethod
    def _needed(st) -> int:
        """Tokens still needed to finish (one per byte at worst, the special tokens and EOS included)."""
        phase, x = st
        if phase == "open":
            return 1 + 2 + 4 + 3  # <tool_call> + shortest head... a lower bound is enough here
        if phase == "head":
            cands, pos = x
            return min(len(h) for h in cands) - pos + 2 + 3
        if phase == "args":
            return json_close_len(x) + 3
        return {"close": 2, "end": 1}[phase]

    def _next(self, token: int):
        phase = self.state[0]
        if token in self.eos:
            return ("done", None) if phase == "end" else None
        if token == self.open_id:
            return ("head", (self.heads, 0)) if phase == "open" else None
        if token == self.close_id:
            return ("end", None) if phase == "close" else None
        data = self.token_bytes[token] if token < len(self.token_bytes) else None
        return self._feed(self.state, data) if data else None

    @property
    def complete(self) -> bool:
        return self.state[0] in ("end", "done")

    def allows(self, token: int) -> bool:
        nx = self._next(token)
        if nx is None:
            return False
        if nx[0] == "done":
            return True
        left = self.max_tokens - self.n - 1  # tokens left after this one
        return self._needed(nx) <= left or self._needed(self.state) > left + 1  # infeasible budget: no squeeze

    def allowed_mask(self, vocab: int, device=None) -> torch.Tensor:
        import torch  # here, not at the top: the HTTP process builds guides without torch

        return torch.tensor([self.allows(i) for i in range(vocab)], dtype=torch.bool, device=device)

    def advance(self, token: int) -> None:
        self.n += 1
        nx = self._next(token)
        if nx is not None:
            self.state = nx


class ForcedGuide:
    """The first generated tokens are exactly `ids`; then anything (a berrylm extension, `forced_tokens`)."""

    def __init__(self, ids: list[int]):
        self.ids, self.i = list(ids), 0

    @property
    def complete(self) -> bool:
        return self.i >= len(self.ids)

    def allows(self, token: int) -> bool:
        return self.complete or token == self.ids[self.i]

    def allowed_mask(self, vocab: int, device=None) -> torch.Tensor:
        import torch  # here, not at the top: the HTTP process builds guides without torch

        if self.complete:
            return torch.ones(vocab, dtype=torch.bool, device=device)
        m = torch.zeros(vocab, dtype=torch.bool, device=device)
        m[self.ids[self.i]] = True
        return m

    def advance(self, token: int) -> None:
        self.i += 1


class MarkerDetokenizer(Detokenizer):
    """A Detokenizer that keeps the text of the tool-call special tokens so the API can parse calls."""

    def __init__(self, tokenizer, stop: list[str] | None, keep: set[int]):
        super().__init__(tokenizer, stop, skip_special=True)
        self.keep = keep

    def _decode(self, token: int) -> str:
        if token in self.keep:
            return self.utf8.decode(b"", final=True) + self.tokenizer.id_to_token(token)
        return super()._decode(token)


# --- model output -> OpenAI tool_calls ---
class ToolCallStream:
    """One choice's output text -> visible content + tool calls, incrementally (model/toolcall.py parses).

    feed(text) -> (content, deltas): for each call completed by this text, OpenAI `delta.tool_calls` entries:
    the head {index, id, type, function: {name, arguments: ""}}, then the arguments. Malformed calls are dropped."""

    def __init__(self):
        self.parser = ToolCallParser()
        self.calls: list[dict] = []  # finished valid calls, as OpenAI message.tool_calls entries

    def _calls(self, parsed) -> list[dict]:
        out = []
        for c in parsed:
            if c.error:
                continue
            i, cid = len(self.calls), new_call_id()
            self.calls.append({"id": cid, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments_json}})
            out.append({"index": i, "id": cid, "type": "function", "function": {"name": c.name, "arguments": ""}})
            out.append({"index": i, "function": {"arguments": c.arguments_json}})
        return out

    def feed(self, text: str) -> tuple[str, list[dict]]:
        visible, parsed = self.parser.feed(text)
        return visible, self._calls(parsed)

    def finish(self) -> tuple[str, list[dict]]:
        visible, parsed = self.parser.finish()
        return visible, self._calls(parsed)
