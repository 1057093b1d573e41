"""The HTTP layer's state and the plumbing every endpoint shares: request bodies -> request models (400s in OpenAI's
shape), API keys, submitting to a model's engine and relaying its Deltas from a per-request asyncio queue, and
token / logprob formatting.

    srv = Server(registry, api_keys, ...)
    body = parse_body(raw, ChatCompletionRequest)                 # or a 400 naming the field
    rids, q = srv.submit(model, [(prompt, params, tools, guide)], n)   # one engine request per prompt, one queue
    async for d in srv.deltas(model, rids, q, n_total, request): ...   # every choice to its finish; aborts the
                                                                       # requests when the client goes away
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque

from fastapi import Request
from pydantic import ValidationError

from berrylm.serve.config import QueueFull
from berrylm.serve.engine_process import EngineDown
from berrylm.serve.guard import DEFAULT_MAX_REQUEST_BYTES, Bounded
from berrylm.serve.models import ModelRegistry, ServedModel
from berrylm.serve.protocol import APIError
from berrylm.serve.relay import DeltaRelay, coalesce
from berrylm.serve.sequence import Delta


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    # drop pydantic's union-member tags like 'str' / 'list[str]' / 'function-after[...]'
    parts = [p for p in parts if not (p[:1].isalpha() and ("[" in p or p in ("str", "int", "float", "bool")))]
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if err.get("type") == "missing":
        return f"'{_param(err.get('loc', ()))}' is a required property"
    return msg.removeprefix("Value error, ")


def validation_error(errs: list) -> APIError:
    first = errs[0] if errs else {}
    param = None if first.get("type") == "json_invalid" else _param(first.get("loc", ()))  # not a byte offset
    return APIError(400, _validation_message(first), param=param)


def parse_body(raw: bytes, model):
    """Raw JSON bytes -> the request model, or a 400 (invalid JSON, a non-object, a bad field)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        why = str(e).split(":")[0] if isinstance(e, ValueError) else "nested too deeply"
        raise APIError(400, f"the request body is not valid JSON ({why})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


class Server:
    def __init__(self, registry: ModelRegistry, api_keys: list[str] | None = None, metrics=None,
                 builtin_tools: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 prepare_timeout_s: float = 5.0):
        self.registry, self.metrics, self.builtin_tools = registry, metrics, builtin_tools
        self.api_keys = set(api_keys or [])
        self._relay: DeltaRelay | None = None
        self.max_request_bytes = max_request_bytes
        self.bounded = Bounded(2, prepare_timeout_s)

    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if key not in self.api_keys:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    def submit(self, model: ServedModel, requests: list[tuple], n: int) -> tuple[list[str], asyncio.Queue]:
        """requests: (prompt ids, SamplingParams, ToolOptions | None, guide) each; all deliver to one queue."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = DeltaRelay(loop)
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda d: self._relay.put(q, d)
        rids = []
        try:
            for prompt, params, tools, guide in requests:
                rid = uuid.uuid4().hex[:24]
                model.engine.add_request(prompt, params, n, sink, request_id=rid, tools=tools, guide=guide)
                rids.append(rid)
        except (EngineDown, QueueFull) as e:
            for rid in rids:
                model.engine.abort(rid)
            code = e.code if isinstance(e, EngineDown) else "server_busy"
            raise APIError(503, str(e), "server_error", code=code) from None
        return rids, q

    async def deltas(self, model: ServedModel, rids: list[str], q: asyncio.Queue, total: int, request: Request,
                     n: int = 1, ping: float = 0.0):
        """Yield Deltas until all `total` choices finished, their `index` made global (prompt k's choice i is
        k * n + i, as OpenAI numbers them); abort the requests if the client goes away. ping > 0: yield None
        whenever nothing came for `ping` seconds (a stream sends an SSE keep-alive comment then)."""
        left, done = total, False
        offset = {rid: k * n for k, rid in enumerate(rids)}
        watch = asyncio.create_task(self._watch_disconnect(request, model, rids))
        backlog: deque[Delta] = deque()
        loop, timer = asyncio.get_running_loop(), None
        try:
            while left:
                if not backlog:
                    if ping > 0:
                        timer = loop.call_later(ping, q.put_nowait, None)
                    item = await q.get()
                    if timer is not None:
                        timer.cancel()
                    if item is None:
                        yield None
                        continue
                    backlog.append(item)
                while not q.empty():
                    item = q.get_nowait()
                    if item is not None:  # a ping that raced with a delta
                        backlog.append(item)
                if not backlog:
                    continue
                d = coalesce(backlog)  # the client fell behind: one chunk carries the tokens it missed
                if d.finish_reason is not None:
                    left -= 1
                d.index += offset.get(d.request_id, 0)
                yield d
            done = True
        finally:
            watch.cancel()
            if timer is not None:
                timer.cancel()
            if not done:
                for rid in rids:
                    model.engine.abort(rid)

    async def _watch_disconnect(self, request: Request, model: ServedModel, rids: list[str]) -> None:
        """Free the requests' slots the moment the client goes away (not at the next token we fail to send)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for rid in rids:
                    model.engine.abort(rid)
                return

    # --- tokens and logprobs as OpenAI writes them ---
    @staticmethod
    def token_str(model: ServedModel, t: int) -> tuple[str, list[int]]:
        data = model.token_bytes[t] if t < len(model.token_bytes) else None
        if data is None:
            s = model.tok.id_to_token(t) or ""
            return s, list(s.encode())
        return data.decode("utf-8", errors="replace"), list(data)

    def chat_logprobs(self, model: ServedModel, outs) -> dict:
        content = []
        for o in outs:
            s, b = self.token_str(model, o.token)
            top = [dict(zip(("token", "bytes"), self.token_str(model, t)), logprob=lp) for t, lp in (o.top or [])]
            content.append({"token": s, "logprob": o.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, model: ServedModel, outs, offset: int, prompt_tokens: list[int] | None = None,
                            prompt_lps: list | None = None) -> dict:
        """Legacy completions logprobs; with echo the prompt's tokens come first (the first one's logprob null)."""
        tokens, lps, tops, offs = [], [], [], []
        if prompt_tokens is not None:
            offset = 0
            for t, o in zip(prompt_tokens, prompt_lps or [None] * len(prompt_tokens)):
                s = self.token_str(model, t)[0]
                tokens.append(s)
                lps.append(None if o is None else o.logprob)
                tops.append(None if o is None else {self.token_str(model, a)[0]: lp for a, lp in o.top or []})
                offs.append(offset)
                offset += len(s)
        for o in outs:
            s, _ = self.token_str(model, o.token)
            tokens.append(s)
            lps.append(o.logprob)
            tops.append({self.token_str(model, t)[0]: lp for t, lp in (o.top or [])} if o.top is not None else None)
            offs.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
