"""The chat client both front ends share (Streamlit `ui/app.py` and terminal `ui/chat.py`).

It talks to any OpenAI-compatible server through the `openai` package, streams one assistant turn and
assembles it into a Reply: an ordered list of parts (text, or a tool call with its result), plus timing
(TTFT, tokens/s). Every failure becomes a ChatError with one readable line, never a traceback.

Tool calls arrive in two shapes:
    built-in (`berry serve` runs the calculator itself, serve/tools/builtin.py): one chunk per finished call,
        delta.builtin_tool_calls = [{index, id, type, function: {name, arguments}, output}]
        between the text written before the call and the text after it;
    client tools (a server that leaves the call to the client, e.g. `berry serve --no-builtin-tools`):
        delta.tool_calls[i] = {index, id, type, function: {name, arguments}}   (arguments may come in pieces),
        no result.
Reply.to_messages() turns the turn back into OpenAI messages (assistant with tool_calls, tool, assistant),
which the chat template renders exactly as the model saw the round, so the next request keeps the history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai

DEFAULT_URL = "http://127.0.0.1:8000/v1"


class ChatError(RuntimeError):
    """A failure to show the user as one line."""


@dataclass
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""  # JSON text, as streamed
    result: str | None = None

    def args_text(self) -> str:
        """The calculator's expression (or the raw arguments when they are not that shape)."""
        try:
            args = json.loads(self.arguments)
        except ValueError:
            return self.arguments
        if isinstance(args, dict) and len(args) == 1:
            return str(next(iter(args.values())))
        return self.arguments


@dataclass
class Reply:
    parts: list[str | ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float | None = None
    tokens: int = 0  # completion tokens (from usage when the server sends it, else one per content chunk)
    gen_s: float = 0.0  # decode time: first token -> finish (see ChatClient.stream)
    gen_tokens: int = 0  # tokens generated within gen_s
    total_s: float = 0.0  # request sent -> finish
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [p for p in self.parts if isinstance(p, ToolCall)]

    @property
    def tok_per_s(self) -> float | None:
        if self.gen_tokens > 0 and self.gen_s > 1e-3:
            return self.gen_tokens / self.gen_s
        # a one-token answer, or a stream the client read in one burst: the whole request is the only clock left
        return self.tokens / self.total_s if self.tokens > 0 and self.total_s > 0 else None

    def stats(self) -> str:
        bits = []
        if self.ttft_s is not None:
            bits.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        if self.tok_per_s is not None:
            bits.append(f"{self.tok_per_s:.1f} tok/s")
        if self.tokens:
            bits.append(f"{self.tokens} tokens")
        if self.finish_reason == "length":
            bits.append("stopped at the token limit")
        return " · ".join(bits)

    def add_text(self, s: str) -> None:
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += s
        else:
            self.parts.append(s)

    def to_messages(self) -> list[dict]:
        """This turn as OpenAI messages: text before a call rides on the assistant message carrying it."""
        msgs: list[dict] = []
        text = ""
        for p in self.parts:
            if isinstance(p, str):
                text += p
                continue
            msgs.append({"role": "assistant", "content": text or None, "tool_calls": [
                {"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.arguments}}]})
            if p.result is not None:
                msgs.append({"role": "tool", "tool_call_id": p.id, "content": p.result})
            text = ""
        if text or not msgs:
            msgs.append({"role": "assistant", "content": text})
        return msgs


@dataclass
class Event:
    kind: str  # "text" | "tool_call" | "tool_result"
    text: str = ""
    tool: ToolCall | None = None


def friendly_error(e: Exception, base_url: str = "") -> str:
    """One line for any failure of the openai client."""
    where = f" at {base_url}" if base_url else ""
    if isinstance(e, openai.APITimeoutError):
        return f"The server{where} did not answer in time."
    if isinstance(e, openai.APIConnectionError):
        return f"Cannot reach the server{where}: is `berry serve` running?"
    if isinstance(e, openai.AuthenticationError):
        return "The server rejected the API key (401): check the key in the settings."
    msg = _server_message(e)
    if isinstance(e, openai.APIStatusError):
        if getattr(e, "code", None) == "context_length_exceeded":
            return f"The conversation no longer fits the model's context: {msg}. Clear the chat or lower max tokens."
        if e.status_code == 404:
            return f"Not found (404): {msg}"
        if e.status_code == 503:
            return f"The server is busy (503): {msg}"
        return f"The server refused the request ({e.status_code}): {msg}"
    if isinstance(e, openai.APIError):  # an error event inside a stream
        return f"The server failed while answering: {msg}"
    return f"{type(e).__name__}: {e}"


def _server_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", None) or e)


class ChatClient:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        # the openai package insists on a key; servers without --api-key ignore it
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=0)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list().data]
        except openai.OpenAIError as e:
            raise ChatError(friendly_error(e, self.base_url)) from None

    def stream(self, messages: list[dict], reply: Reply, model: str | None = None, **params) -> Iterator[Event]:
        """Stream one assistant turn into `reply`, yielding an Event per piece. params: temperature, top_p,
        max_tokens, seed (None values are left out). Raises ChatError."""
        body = {k: v for k, v in params.items() if v is not None}
        t0 = time.perf_counter()
        t_role = t_first = t_end = None  # request accepted / first output seen / finish chunk
        opened_with_text = False
        chunks = 0
        usage_tokens = None
        by_index: dict[int, ToolCall] = {}
        try:
            stream = self.client.chat.completions.create(
                model=model or "", messages=messages, stream=True, stream_options={"include_usage": True}, **body)
            for chunk in stream:
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    t_role = t_role or time.perf_counter()
                    for ev in self._events(choice.delta, reply, by_index):
                        now = time.perf_counter()
                        if reply.ttft_s is None:
                            reply.ttft_s, t_first, opened_with_text = now - t0, now, ev.kind == "text"
                        chunks += ev.kind == "text"
                        t_end = now
                        yield ev
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
                        t_end = time.perf_counter()
        except openai.OpenAIError as e:
            reply.error = friendly_error(e, self.base_url)
            raise ChatError(reply.error) from None
        finally:
            reply.tokens = usage_tokens if usage_tokens is not None else chunks
            # decode time runs from the first token the client saw; when the answer opened with tokens the
            # server keeps out of the stream (a tool call's text), from the moment the server accepted the request
            start = t_first if opened_with_text else t_role
            if start is not None and t_end is not None:
                reply.total_s = t_end - t0
                reply.gen_s = t_end - start
                reply.gen_tokens = reply.tokens - 1 if opened_with_text else reply.tokens

    @staticmethod
    def _events(delta, reply: Reply, by_index: dict[int, ToolCall]) -> Iterator[Event]:
        if delta is None:
            return
        if delta.content:
            reply.add_text(delta.content)
            yield Event("text", text=delta.content)
        for tc in delta.tool_calls or []:  # a call left to the client: pieces of one call share an index
            call = by_index.get(tc.index)
            if call is None:
                call = by_index[tc.index] = ToolCall(id=tc.id or f"call_{len(by_index)}")
                reply.parts.append(call)
            if tc.function is not None:
                call.name += tc.function.name or ""
                call.arguments += tc.function.arguments or ""
            yield Event("tool_call", tool=call)
        for b in (delta.model_extra or {}).get("builtin_tool_calls") or []:  # a call the server ran, with output
            fn = b.get("function") or {}
            call = ToolCall(id=b.get("id") or f"call_{len(reply.tool_calls)}", name=fn.get("name") or "",
                            arguments=fn.get("arguments") or "", result=str(b.get("output", "")))
            reply.parts.append(call)
            yield Event("tool_call", tool=call)
            yield Event("tool_result", tool=call)
