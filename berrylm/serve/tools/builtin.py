"""Built-in tool use during generation: the server runs the calculator itself and the model reads the result.

When a request carries no `tools` of its own (and the server was not started with --no-builtin-tools), the
engine watches each sequence's tokens. `<tool_call>` (id 3) opens a call; `</tool_call>` (id 4) closes it.
Then the engine pauses that sequence (its KV cache stays), runs the call on a worker thread through the
calculator sandbox (serve/tools/sandbox.py: a separate process with limits), and when the result is back
appends the tokens of (model/toolcall.py `after_call_text`)

    <|im_end|>\n<|im_start|>tool\n<tool_response>{output}</tool_response><|im_end|>\n<|im_start|>assistant\n

to the sequence in ONE prefill and decoding goes on. Other sequences in the batch keep decoding meanwhile.
A request may make at most `max_rounds` calls (default 3); a call beyond that, a call of an unknown tool or
a malformed call is not run and the model reads an error result instead ("error: ...", the format of the
training data). The text of a call is never part of the message content.

Response shape (an extra field the `openai` client keeps in `model_extra`):

    non-stream   choices[i].message = {"role": "assistant", "content": "<the final answer>",
                                       "builtin_tool_calls": [{"id": "call_...", "type": "function",
                                           "function": {"name": "calculator",
                                                        "arguments": "{\\"expression\\": \\"1234*5678\\"}"},
                                           "output": "7006652"}, ...]}
    stream       one chunk per finished call, as soon as its result is back:
                 choices[i].delta = {"builtin_tool_calls": [{"index": k, "id": ..., "type": "function",
                                                              "function": {...}, "output": "7006652"}]}
    with the openai client: `resp.choices[0].message.model_extra["builtin_tool_calls"]`,
                            `chunk.choices[0].delta.model_extra.get("builtin_tool_calls")`.

`content` is the visible text of all rounds (text the model wrote before a call, then the final answer).
Usage: `completion_tokens` counts only tokens the model generated (the call tokens included);
the appended tool-response tokens count as `prompt_tokens` (they are input the model reads, like a tool message).
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from berrylm.model.toolcall import parse_call_body

TOOL_NAME = "calculator"


@dataclass
class ToolOptions:
    """Per-request tool handling in the engine."""
    builtin: bool = False  # run calculator calls in the server (pause, run, append the result, continue)
    markers: bool = False  # keep "<tool_call>" / "</tool_call>" in the text (the API parses client tool calls)


@dataclass
class ToolEvent:
    """One built-in call and its result."""
    id: str
    name: str
    arguments: str  # JSON text of the arguments object
    output: str

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments},
             "output": self.output}
        return d if index is None else {"index": index, **d}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class BuiltinTools:
    """Runs built-in calls off the engine thread. `run(body, round, done)` calls done(ToolEvent) later,
    from a worker thread (or at once for calls that are refused without running)."""

    def __init__(self, max_rounds: int = 3, timeout_s: float = 1.0, workers: int = 1):
        self.max_rounds, self.timeout_s = max_rounds, timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="berry-tool")
        self._calc = None
        self._lock = threading.Lock()
        self.workers = workers

    def calculator(self):
        with self._lock:  # the sandbox starts its worker process lazily, on the first call
            if self._calc is None:
                from berrylm.serve.tools.sandbox import Calculator

                self._calc = Calculator(workers=self.workers, timeout_s=self.timeout_s)
            return self._calc

    def run(self, body: str, round_index: int, done) -> None:
        """body: the text between <tool_call> and </tool_call>; round_index: calls this request made before."""
        call = parse_call_body(body)
        cid = new_call_id()
        if call.error:
            done(ToolEvent(cid, call.name, body.strip(), f"error: {call.error}"))
        elif round_index >= self.max_rounds:
            done(ToolEvent(cid, call.name, call.arguments_json,
                           f"error: tool call limit reached ({self.max_rounds} per request)"))
        elif call.name != TOOL_NAME:
            done(ToolEvent(cid, call.name, call.arguments_json, f"error: unknown tool {call.name}"))
        else:
            def work():
                try:
                    out = self.calculator().call(call.name, call.arguments_json).content
                except Exception as e:  # noqa: BLE001 - the sequence must resume whatever happens
                    out = f"error: calculator unavailable ({type(e).__name__})"
                done(ToolEvent(cid, call.name, call.arguments_json, out))

            self.pool.submit(work)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._calc is not None:
                self._calc.close()
                self._calc = None
