"""`POST /v1/responses`: OpenAI's Responses API, stateless, as a thin layer over the chat path.

Request -> a ChatCompletionRequest: `input` (a string, or items: messages with string or input_text/output_text
parts, `function_call` and `function_call_output` items), `instructions` (a system message first),
`max_output_tokens`, `temperature`, `top_p`, function `tools` (flat: {type, name, description, parameters,
strict}), `tool_choice`, `parallel_tool_calls`, `text.format` (text, json_object, json_schema: enforced like
response_format, serve/structured.py). Refused with a 400 (no state is kept here): `store: true`,
`previous_response_id`, `conversation`, `background`; also fields that would otherwise be ignored: `reasoning`,
`include`, `top_logprobs`, `prompt`, non-function tools.
Response: output items (a `message` with one output_text part; a `function_call` per call), `status` completed or
incomplete (max_output_tokens), usage. Streaming: typed events with sequence numbers: response.created,
response.in_progress, then per item output_item.added, content_part.added, output_text.delta..., output_text.done,
content_part.done, output_item.done (function calls: function_call_arguments.delta / .done), and
response.completed (or response.incomplete).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field

from berrylm.serve.guard import read_body
from berrylm.serve.http_options import PING
from berrylm.serve.prepare import prepare_chat
from berrylm.serve.protocol import MAX_MESSAGES, MAX_TOOLS, APIError, ChatCompletionRequest, _Strict
from berrylm.serve.responses import ChoiceAggregator, engine_failed, sse
from berrylm.serve.server import Server, parse_body

REFUSED = {"store": lambda v: v is True, "previous_response_id": lambda v: v is not None,
           "conversation": lambda v: v is not None, "background": lambda v: v is True,
           "reasoning": lambda v: v is not None, "include": lambda v: bool(v), "top_logprobs": lambda v: bool(v),
           "prompt": lambda v: v is not None}


class ResponsesRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    user: str | None = None


def _text_of(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(p.get("text"), str):
                raise APIError(400, "only text content parts (input_text, output_text) are supported",
                               param=f"input[{i}].content")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, "a message's content must be a string or a list of text parts", param=f"input[{i}].content")


def to_messages(body: ResponsesRequest) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return msgs + [{"role": "user", "content": body.input}]
    for i, it in enumerate(body.input):
        kind = it.get("type", "message")
        if kind == "message":
            if it.get("role") not in ("user", "system", "developer", "assistant"):
                raise APIError(400, "a message's role must be user, system, developer or assistant",
                               param=f"input[{i}].role")
            msgs.append({"role": it["role"], "content": _text_of(it.get("content"), i)})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str) or not isinstance(it.get("arguments"), str):
                raise APIError(400, "a function_call item needs a name and arguments", param=f"input[{i}]")
            call = {"id": it.get("call_id"), "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": it.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise APIError(400, f"input items of type '{str(kind)[:40]}' are not supported", param=f"input[{i}].type")
    return msgs


def to_chat(body: ResponsesRequest) -> tuple[ChatCompletionRequest, dict | None]:
    """-> (the chat request, the json_schema text.format asks for)."""
    extra = body.model_extra or {}
    for name, refused in REFUSED.items():
        if name in extra and refused(extra[name]):
            raise APIError(400, f"'{name}' is not supported: this server keeps no state and implements the "
                                "Responses API's text and function-tool parts only", param=name,
                           code="unsupported_parameter")
    tools = []
    for i, t in enumerate(body.tools or []):
        if t.get("type") != "function":
            raise APIError(400, f"tools of type '{str(t.get('type'))[:40]}' are not supported (function only)",
                           param=f"tools[{i}].type")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                         "strict") if k in t}})
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fmt = (body.text or {}).get("format") or {"type": "text"}
    schema, response_format = None, None
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema", {})
        if not isinstance(schema, dict):
            raise APIError(400, "text.format.schema must be a JSON schema object", param="text.format.schema")
    elif fmt.get("type") == "json_object":
        response_format = {"type": "json_object"}
    elif fmt.get("type") != "text":
        raise APIError(400, "text.format.type must be text, json_object or json_schema", param="text.format.type")
    chat = {"model": body.model, "messages": to_messages(body), "stream": False}
    for k, v in (("max_completion_tokens", body.max_output_tokens), ("temperature", body.temperature),
                 ("top_p", body.top_p), ("tools", tools or None), ("tool_choice", choice),
                 ("parallel_tool_calls", body.parallel_tool_calls), ("response_format", response_format)):
        if v is not None:
            chat[k] = v
    return parse_body(json.dumps(chat).encode(), ChatCompletionRequest), schema


def prepare(srv: Server, raw: bytes):
    body = parse_body(raw, ResponsesRequest)
    chat, schema = to_chat(body)
    return body, prepare_chat(srv, b"", chat, schema, "text.format.schema")


class ResponseBuilder:
    """Choice updates -> Responses output items, and the stream events that build them."""

    def __init__(self, rid: str, model: str, body: ResponsesRequest):
        self.seq, self.items, self.open_msg = 0, [], None
        self.base = {"id": f"resp_{rid}", "object": "response", "created_at": int(time.time()), "model": model,
                     "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                     "temperature": body.temperature if body.temperature is not None else 1.0,
                     "top_p": body.top_p if body.top_p is not None else 1.0, "tools": body.tools or [],
                     "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls
                     is not False, "text": body.text or {"format": {"type": "text"}}, "metadata": body.metadata
                     or {}, "store": False, "error": None, "incomplete_details": None, "user": body.user}

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields})

    def response(self, status: str, usage: dict | None = None, reason: str | None = None) -> dict:
        r = {**self.base, "status": status, "output": self.items if status != "in_progress" else []}
        if reason:
            r["incomplete_details"] = {"reason": reason}
        if usage is not None:
            r["usage"] = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                          "total_tokens": usage["total_tokens"],
                          "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                          "output_tokens_details": {"reasoning_tokens": 0}}
        return r

    def start(self) -> list[str]:
        return [self.event(k, response=self.response("in_progress")) for k in ("response.created",
                                                                            "response.in_progress")]

    def text(self, delta: str) -> list[str]:
        out = []
        if self.open_msg is None:
            msg = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "status": "in_progress",
                   "role": "assistant", "content": []}
            self.items.append(msg)
            self.open_msg = len(self.items) - 1
            out.append(self.event("response.output_item.added", output_index=self.open_msg, item=dict(msg)))
            out.append(self.event("response.content_part.added", item_id=msg["id"], output_index=self.open_msg,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            msg["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
        msg = self.items[self.open_msg]
        msg["content"][0]["text"] += delta
        out.append(self.event("response.output_text.delta", item_id=msg["id"], output_index=self.open_msg,
                              content_index=0, delta=delta, logprobs=[]))
        return out

    def close_message(self) -> list[str]:
        if self.open_msg is None:
            return []
        i, self.open_msg = self.open_msg, None
        msg = self.items[i]
        msg["status"] = "completed"
        part = msg["content"][0]
        return [self.event("response.output_text.done", item_id=msg["id"], output_index=i, content_index=0,
                           text=part["text"], logprobs=[]),
                self.event("response.content_part.done", item_id=msg["id"], output_index=i, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=i, item=msg)]

    def call(self, call: dict) -> list[str]:
        out = self.close_message()
        f = call["function"]
        item = {"id": f"fc_{uuid.uuid4().hex[:24]}", "type": "function_call", "status": "in_progress",
                "call_id": call["id"], "name": f["name"], "arguments": ""}
        self.items.append(item)
        i = len(self.items) - 1
        out.append(self.event("response.output_item.added", output_index=i, item=dict(item)))
        out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                              delta=f["arguments"]))
        item.update(arguments=f["arguments"], status="completed")
        out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                              name=f["name"], arguments=f["arguments"]))
        out.append(self.event("response.output_item.done", output_index=i, item=item))
        return out

    def update(self, u, agg: ChoiceAggregator) -> list[str]:
        out = self.text(u.text) if u.text else []
        done = len(agg.tool_calls(0)) - len([t for t in u.tool_deltas if "id" in t])
        for call in agg.tool_calls(0)[done:]:
            out += self.call(call)
        return out

    def finish(self, agg: ChoiceAggregator) -> tuple[list[str], dict]:
        out = self.close_message()
        reason = "max_output_tokens" if agg.reasons[0] == "length" else None
        final = self.response("incomplete" if reason else "completed", agg.usage(), reason)
        out.append(self.event("response.incomplete" if reason else "response.completed", response=final))
        return out, final


def register(app: FastAPI, srv: Server, http) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request):
        raw = await read_body(request, srv.max_request_bytes)
        body, p = await srv.bounded.run(prepare, srv, raw)
        rids, q = srv.submit(p.model, p.requests(), 1)
        if srv.metrics is not None:
            srv.metrics.requests.labels("/v1/responses", "200").inc()
        b = ResponseBuilder(rids[0], p.model.name, body)
        agg = ChoiceAggregator(1, len(p.prompt), parse=p.parse)
        deltas = srv.deltas(p.model, rids, q, 1, request, ping=http.sse_ping_interval if body.stream else 0)

        async def stream():
            for e in b.start():
                yield e
            async for d in deltas:
                if d is None:  # nothing for --sse-ping-interval seconds
                    yield PING
                    continue
                u = agg.add(d)
                if agg.failed:
                    yield b.event("error", **engine_failed(agg.failed).body()["error"])
                    return
                for e in b.update(u, agg):
                    yield e
            for e in b.finish(agg)[0]:
                yield e

        if body.stream:
            return StreamingResponse(stream(), media_type="text/event-stream")
        async for d in deltas:
            u = agg.add(d)
            b.update(u, agg)
        if agg.failed:
            raise engine_failed(agg.failed)
        return JSONResponse(b.finish(agg)[1])

