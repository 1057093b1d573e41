"""The tool-call text format shared by the chat template, the training data, exports and the server.

An assistant turn calls a tool by writing, after any visible content,

    <tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>

(json.dumps with default separators). `<tool_call>` and `</tool_call>` are special tokens (ids 3 and 4), so
the server sees a call start and end as single tokens. The result comes back in a `tool` turn
(`tool_turn`): `<|im_start|>tool\n<tool_response>84</tool_response><|im_end|>\n`. Generation that runs the call
itself (the server's built-in tools, train/generate.py) appends `after_call_text(result)` after `</tool_call>`:
the assistant turn closes, the tool turn, a new assistant turn opens. The chat template (chat_template.jinja) and
the Ollama template (export/ollama.py) render the same text; tests/test_tokenizer.py holds them to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_TURN_OPEN, TOOL_TURN_CLOSE = "<|im_start|>tool\n<tool_response>", "</tool_response><|im_end|>\n"

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression in Python syntax (+ - * / // % **, parentheses, "
                       "sqrt, exp, log, sin, cos, tan, floor, ceil, factorial, abs, round, min, max, pi, e) "
                       "and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12*7 or (3+4)/2"}},
            "required": ["expression"],
        },
    },
}


def format_tool_call(name: str, arguments: dict) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def tool_turn(result: str) -> str:
    """A `tool` message as the chat template renders it."""
    return TOOL_TURN_OPEN + result + TOOL_TURN_CLOSE


def after_call_text(result: str) -> str:
    """What generation appends after `</tool_call>`: the assistant turn ends, the tool turn, a new assistant turn."""
    return "<|im_end|>\n" + tool_turn(result) + "<|im_start|>assistant\n"


@dataclass
class ParsedCall:
    name: str
    arguments_json: str  # the arguments object as a JSON string (OpenAI's `function.arguments`)
    error: str | None = None  # set when the call text was malformed

    @property
    def arguments(self) -> dict:
        return json.loads(self.arguments_json) if not self.error else {}


def parse_call_body(body: str) -> ParsedCall:
    """The text between <tool_call> and </tool_call> -> ParsedCall (error set instead of raising: the text is the
    model's, or a client's via forced_tokens, and may be nested deeper than the JSON parser's recursion limit)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return ParsedCall("", "", "tool call is not valid JSON")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ParsedCall("", "", "tool call has no name")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return ParsedCall(obj["name"], "", "tool call arguments are not valid JSON")
    if not isinstance(args, dict):
        return ParsedCall(obj["name"], "", "tool call arguments must be an object")
    try:
        return ParsedCall(obj["name"], json.dumps(args))
    except (ValueError, RecursionError):
        return ParsedCall(obj["name"], "", "tool call arguments are nested too deeply")


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every complete <tool_call>...</tool_call> in text, in order."""
    calls, pos = [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start)
        if end < 0:
            break
        calls.append(parse_call_body(text[start + len(OPEN): end]))
        pos = end + len(CLOSE)
    return calls


def split_content(text: str) -> tuple[str, list[ParsedCall]]:
    """(visible content before the first call, the calls)."""
    i = text.find(OPEN)
    return (text if i < 0 else text[:i]), parse_tool_calls(text)


class ToolCallParser:
    """Streaming: feed text deltas; get back (visible text safe to emit now, calls completed by this delta).

    Text that might be the start of "<tool_call>" is held back until it is decided. Everything between
    <tool_call> and </tool_call> is never emitted as content.
    """

    def __init__(self):
        self.buf = ""
        self.in_call = False
        self.body = ""

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        self.buf += delta
        visible, calls = "", []
        while self.buf:
            if self.in_call:  # the closing tag may arrive split over several deltas: search the whole body
                seen = len(self.body)
                self.body, self.buf = self.body + self.buf, ""
                end = self.body.find(CLOSE, max(0, seen - len(CLOSE) + 1))
                if end < 0:
                    break
                calls.append(parse_call_body(self.body[:end]))
                self.buf, self.body, self.in_call = self.body[end + len(CLOSE):], "", False
                continue
            start = self.buf.find(OPEN)
            if start >= 0:
                visible += self.buf[:start]
                self.buf, self.in_call = self.buf[start + len(OPEN):], True
                continue
            keep = _partial_suffix(self.buf, OPEN)
            visible += self.buf[: len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return visible, calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """End of generation: held-back text is content; an unterminated call is an error."""
        if self.in_call:
            self.in_call, body, self.body, self.buf = False, self.body + self.buf, "", ""
            return "", [ParsedCall("", "", "unterminated tool call: " + body[:40])]
        out, self.buf = self.buf, ""
        return out, []


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of token."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
