"""OpenAI response bodies from engine Deltas: one aggregator serves the streamed and the non-streamed response.

    agg = ChoiceAggregator(n, n_prompt, parse=..., echo=...)
    u = agg.add(delta)     # accumulates, and returns what this delta adds to its choice: visible text, client
                           # tool-call deltas, built-in tool events, logprobs, the finish reason as reported
    agg.text[i], agg.tool_calls(i), agg.events[i], agg.reasons[i], agg.usage(), agg.failed

With `parse` (client tools, or no built-in calculator) the `<tool_call>` text of a choice is parsed out of its
content into OpenAI tool calls, and a choice that stopped after calls reports finish_reason "tool_calls".
A choice that ends with the engine's "error" (or engine_died) sets `failed`: the response is engine_failed(reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from berrylm.serve.engine_process import ENGINE_DIED
from berrylm.serve.http_options import PING
from berrylm.serve.protocol import APIError
from berrylm.serve.sequence import Delta
from berrylm.serve.tools.openai_tools import ToolCallStream


def engine_failed(reason: str = "error") -> APIError:
    """What the client is told about a choice that ended with an engine-side failure ("error": this choice
    failed and nothing else; ENGINE_DIED: the engine process died and is being restarted)."""
    if reason == ENGINE_DIED:
        return APIError(503, "the engine process died while generating (the server logged it; see /health)",
                        "server_error", code=ENGINE_DIED)
    return APIError(500, "generating this choice failed (the server logged the cause); other requests are "
                         "unaffected", "server_error", code="generation_failed")


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class ChoiceUpdate:
    """What one Delta adds to its choice, as a streamed chunk shows it."""
    index: int
    text: str  # visible content (tool-call text parsed out)
    tool_deltas: list[dict] = field(default_factory=list)  # OpenAI delta.tool_calls entries completed by it
    events: list = field(default_factory=list)  # built-in tool calls whose result came back
    logprobs: list = field(default_factory=list)  # SampleOut per token
    finish_reason: str | None = None


class ChoiceAggregator:
    """n choices. n_prompt: the prompt's tokens, or with several prompts each choice's prompt tokens (usage counts
    each prompt once: `n_per_prompt` choices share one). echo: text each choice starts with."""

    def __init__(self, n: int, n_prompt: int | list[int], parse: bool = False, echo: str | list[str] = "",
                 n_per_prompt: int | None = None):
        self.prompt_lens = [n_prompt] * n if isinstance(n_prompt, int) else list(n_prompt)
        self.n_prompt = self.prompt_lens[0] if isinstance(n_prompt, int) else sum(
            self.prompt_lens[:: n_per_prompt or 1])
        self.text = [echo] * n if isinstance(echo, str) else list(echo)
        self.prompt_logprobs: list = [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.events: list[list] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.completion, self.injected, self.cached = [0] * n, [0] * n, 0
        self.parsers = [ToolCallStream() for _ in range(n)] if parse else None
        self.failed: str | None = None  # the failing finish reason

    def add(self, d: Delta) -> ChoiceUpdate:
        i = d.index
        self.completion[i], self.injected[i], self.cached = (d.completion_tokens, d.prompt_tokens - self.prompt_lens[i],
                                                             d.cached_tokens)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs[i] = d.prompt_logprobs
        if d.finish_reason in ("error", ENGINE_DIED):
            self.failed = d.finish_reason
            return ChoiceUpdate(i, "", finish_reason=d.finish_reason)
        text, tool_deltas, reason = d.text, [], d.finish_reason
        if self.parsers is not None:
            text, tool_deltas = self.parsers[i].feed(d.text)
            if reason is not None:
                rest, more = self.parsers[i].finish()
                text, tool_deltas = text + rest, tool_deltas + more
                if reason == "stop" and self.parsers[i].calls:
                    reason = "tool_calls"
        self.text[i] += text
        self.logprobs[i] += d.logprobs
        self.events[i] += d.tool_events
        self.reasons[i] = reason or self.reasons[i]
        return ChoiceUpdate(i, text, tool_deltas, d.tool_events, d.logprobs, reason)

    def tool_calls(self, i: int) -> list[dict]:
        return self.parsers[i].calls if self.parsers is not None else []

    def usage(self) -> dict:
        return usage(self.n_prompt + sum(self.injected), sum(self.completion), self.cached)


def chat_choices(agg: ChoiceAggregator, logprobs_of) -> list[dict]:
    """The non-streamed chat.completion choices; logprobs_of(outs) -> the logprobs object, or None when off."""
    choices = []
    for i, text in enumerate(agg.text):
        msg = {"role": "assistant", "content": text}
        if agg.tool_calls(i):
            msg["content"], msg["tool_calls"] = text or None, agg.tool_calls(i)
        if agg.events[i]:
            msg["builtin_tool_calls"] = [e.to_openai() for e in agg.events[i]]
        choices.append({"index": i, "message": msg, "logprobs": logprobs_of(agg.logprobs[i]),
                        "finish_reason": agg.reasons[i]})
    return choices


async def chat_stream(deltas, agg: ChoiceAggregator, head: dict, usage_on: bool, logprobs_of):
    """SSE chunks of a chat completion from the Deltas; logprobs_of(outs) -> the logprobs object."""
    chunk = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if usage_on else {}
    delta = lambda i, dl, lp=None, reason=None: sse({**chunk, "choices": [  # noqa: E731
        {"index": i, "delta": dl, "logprobs": lp, "finish_reason": reason}], **extra})
    for i in range(len(agg.text)):
        yield delta(i, {"role": "assistant", "content": ""})
    async for d in deltas:
        if d is None:  # nothing for --sse-ping-interval seconds
            yield PING
            continue
        u = agg.add(d)
        if agg.failed:
            yield sse(engine_failed(agg.failed).body())
            return
        first = len(agg.events[u.index]) - len(u.events)
        for k, ev in enumerate(u.events):
            yield delta(u.index, {"builtin_tool_calls": [ev.to_openai(first + k)]})
        lp = logprobs_of(u.logprobs) if u.logprobs else None
        if u.text or lp:
            yield delta(u.index, {"content": u.text}, lp)
        for td in u.tool_deltas:
            yield delta(u.index, {"tool_calls": [td]})
        if u.finish_reason is not None:
            yield delta(u.index, {}, None, u.finish_reason)
    if usage_on:
        yield sse({**chunk, "choices": [], "usage": agg.usage()})
    yield "data: [DONE]\n\n"


async def completion_stream(deltas, agg: ChoiceAggregator, head: dict, usage_on: bool, logprobs_of):
    """SSE chunks of a text completion; logprobs_of(i, outs, offset, prompt_lps) -> the logprobs object, or None
    when not asked for (with echo, the echoed prompt's logprobs come with its chunk once the engine sent them)."""
    chunk = {**head, "object": "text_completion"}
    extra = {"usage": None} if usage_on else {}
    echo = list(agg.text)
    offsets = [len(e) for e in echo]
    sent_echo = [False] * len(echo)
    async for d in deltas:
        if d is None:  # nothing for --sse-ping-interval seconds
            yield PING
            continue
        u = agg.add(d)
        if agg.failed:
            yield sse(engine_failed(agg.failed).body())
            return
        i = u.index
        if echo[i] and not sent_echo[i]:
            sent_echo[i] = True
            lp = logprobs_of(i, [], 0, agg.prompt_logprobs[i])
            yield sse({**chunk, "choices": [{"index": i, "text": echo[i], "logprobs": lp, "finish_reason": None}],
                       **extra})
        lp = logprobs_of(i, u.logprobs, offsets[i], None) if u.logprobs else None
        if lp:
            offsets[i] += sum(len(t) for t in lp["tokens"])
        if u.text or lp or u.finish_reason:
            yield sse({**chunk, "choices": [{"index": i, "text": u.text, "logprobs": lp,
                                             "finish_reason": u.finish_reason}], **extra})
    if usage_on:
        yield sse({**chunk, "choices": [], "usage": agg.usage()})
    yield "data: [DONE]\n\n"
