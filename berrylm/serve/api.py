"""The OpenAI-compatible HTTP layer (FastAPI). It validates, renders the prompt, hands the request to the
engine thread and relays its Deltas from a per-request asyncio queue, as one JSON body or as SSE.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics
Errors are always {"error": {"message", "type", "param", "code"}}; a pydantic validation error becomes a
400 naming the parameter. With --api-key, /v1/* needs `Authorization: Bearer KEY`; /health and /metrics
stay open. A body over --max-request-bytes is a 413; parsing, the chat template and tokenization run on a
thread with a time bound (serve/guard.py), and a prompt that cannot fit the context is refused by its length
in characters before it is tokenized, so no body can stall the event loop that streams everyone's tokens.
Tools: client `tools` / `tool_choice` / `parallel_tool_calls` are handled with serve/tools/openai_tools.py; without
client tools the server runs calculator calls itself (serve/tools/builtin.py documents the response fields).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from berrylm.serve.config import ContextLengthExceeded, QueueFull, context_budget
from berrylm.serve.engine_process import EngineDown, RemoteEngine
from berrylm.serve.guard import DEFAULT_MAX_REQUEST_BYTES, Bounded, dumps, freeze_heap, read_body
from berrylm.serve.params import SamplingParams
from berrylm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from berrylm.serve.relay import DeltaRelay, coalesce
from berrylm.serve.responses import ChoiceAggregator, chat_choices, chat_stream, completion_stream, engine_failed
from berrylm.serve.sequence import Delta
from berrylm.serve.tools.builtin import ToolOptions
from berrylm.serve.tools.openai_tools import ForcedGuide, ToolCallGuide, resolve_tool_choice

if TYPE_CHECKING:  # the HTTP process of `berry serve` never imports torch: the engine runs in its own process
    from berrylm.serve.engine import Engine


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


def _validation_error(errs: list) -> APIError:
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
        raise _validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


@dataclass
class Prepared:
    """A validated request, ready for the engine."""
    body: ChatCompletionRequest | CompletionRequest
    prompt: list[int]
    params: SamplingParams
    tools: ToolOptions | None = None
    guide: object = None
    parse: bool = False  # chat: parse tool calls out of the text
    echo: str = ""  # completions: the prompt text echoed back


class Server:
    def __init__(self, engine: Engine | RemoteEngine, model_name: str, api_keys: list[str] | None = None, metrics=None,
                 builtin_tools: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 prepare_timeout_s: float = 5.0):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.builtin_tools = builtin_tools
        self.api_keys = set(api_keys or [])
        self.tok = engine.tokenizer
        self.created = int(time.time())
        self._relay: DeltaRelay | None = None
        self.max_request_bytes = max_request_bytes
        self.bounded = Bounded(2, prepare_timeout_s)
        # a text of more characters than this has more tokens than the context holds (a token is at most
        # `longest` bytes, and a character at least one): refused before tokenizing
        longest = max((len(b) for b in engine.token_bytes if b), default=1)
        self.max_chars = engine.max_model_len * max(longest, 1)

    # --- helpers ---
    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if key not in self.api_keys:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist (this server serves '{self.model_name}')",
                           "invalid_request_error", param="model", code="model_not_found")

    def check_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_chars:
            raise APIError(400, f"this model's maximum context length is {self.engine.max_model_len} tokens, and the "
                                f"{param} ({n_chars} characters) cannot fit in it", param=param,
                           code="context_length_exceeded")

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        try:
            return context_budget(len(prompt), max_tokens, self.engine.max_model_len)
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None

    def submit(self, prompt: list[int], params, n: int, tools: ToolOptions | None = None,
               guide=None) -> tuple[str, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = DeltaRelay(loop)
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda d: self._relay.put(q, d)
        rid = uuid.uuid4().hex[:24]
        try:
            self.engine.add_request(prompt, params, n, sink, request_id=rid, tools=tools, guide=guide)
        except EngineDown as e:
            raise APIError(503, str(e), "server_error", code=e.code) from None
        except QueueFull as e:
            raise APIError(503, str(e), "server_error", code="server_busy") from None
        return rid, q

    async def deltas(self, rid: str, q: asyncio.Queue, n: int, request: Request):
        """Yield Deltas until every choice finished; abort the request if the client goes away."""
        left = n
        done = False
        watch = asyncio.create_task(self._watch_disconnect(request, rid))
        backlog: deque[Delta] = deque()
        try:
            while left:
                if not backlog:
                    backlog.append(await q.get())
                while not q.empty():
                    backlog.append(q.get_nowait())
                d = coalesce(backlog)  # the client fell behind: one chunk carries the tokens it missed
                if d.finish_reason is not None:
                    left -= 1
                yield d
            done = True
        finally:
            watch.cancel()
            if not done:
                self.engine.abort(rid)

    async def _watch_disconnect(self, request: Request, rid: str) -> None:
        """Free the request's slot the moment the client goes away (not at the next token we fail to send)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.engine.abort(rid)
                return

    # --- request preparation (on a bounded thread: serve/guard.py) ---
    def prepare_chat(self, raw: bytes) -> Prepared:
        srv, engine = self, self.engine
        body = parse_body(raw, ChatCompletionRequest)
        srv.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [m.to_template() for m in body.messages]
        srv.check_chars(sum(len(m["content"] or "") for m in messages), "messages")
        try:
            mode, names = resolve_tool_choice(body.tool_choice, body.tools)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice" if body.tools else "tools") from None
        json_mode = body.response_format is not None and body.response_format.type != "text"
        # built-in calculator: only without client tools; else calculator calls are parsed like any tool call
        builtin = srv.builtin_tools and not body.tools and body.tool_choice != "none" and not json_mode
        parse = mode != "none" or (not body.tools and not builtin and body.tool_choice != "none")
        try:
            text = srv.tok.render_chat(messages, tools=body.tools if mode != "none" else None,
                                       add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. raise_exception) are the client's input
            raise APIError(400, f"cannot render the messages: {str(e)[:200]}", param="messages") from None
        srv.check_chars(len(text), "messages")
        prompt = srv.tok.encode(text)
        max_tokens = srv.budget(prompt, body.max_completion_tokens or body.max_tokens)
        params = body.sampling(srv.tok.vocab_size, max_tokens, body.logprobs, body.top_logprobs or 0, json_mode)
        guide = None
        if mode == "forced":
            if body.forced_tokens:
                raise APIError(400, "forced_tokens cannot be combined with a forced tool_choice", param="forced_tokens")
            guide = partial(ToolCallGuide, engine.token_bytes, srv.tok.eos_ids, names, max_tokens,
                            srv.tok.tool_call_id, srv.tok.tool_call_end_id)  # picklable: the engine process
        elif body.forced_tokens:
            if any(not 0 <= t < srv.tok.vocab_size for t in body.forced_tokens):
                raise APIError(400, "forced_tokens contains ids outside the vocabulary", param="forced_tokens")
            if len(body.forced_tokens) > max_tokens:
                raise APIError(400, "forced_tokens is longer than max_tokens", param="forced_tokens")
            guide = partial(ForcedGuide, body.forced_tokens)
        if parse and body.parallel_tool_calls is False:
            params.stop_token_ids.append(srv.tok.tool_call_end_id)  # one call, then stop
        return Prepared(body, prompt, params, ToolOptions(builtin=builtin, markers=parse), guide, parse)

    def prepare_completion(self, raw: bytes) -> Prepared:
        srv = self
        body = parse_body(raw, CompletionRequest)
        srv.check_model(body.model)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, str):
            srv.check_chars(len(p), "prompt")
            prompt = srv.tok.encode(p)
        else:
            if any(not 0 <= t < srv.tok.vocab_size for t in p):
                raise APIError(400, "prompt contains token ids outside the vocabulary", param="prompt")
            prompt = list(p)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = srv.budget(prompt, body.max_tokens)
        params = body.sampling(srv.tok.vocab_size, max_tokens, body.logprobs is not None, body.logprobs or 0)
        return Prepared(body, prompt, params, echo=srv.tok.decode(prompt) if body.echo else "")

    def token_str(self, t: int) -> tuple[str, list[int]]:
        data = self.engine.token_bytes[t] if t < len(self.engine.token_bytes) else None
        if data is None:
            s = self.tok.id_to_token(t) or ""
            return s, list(s.encode())
        return data.decode("utf-8", errors="replace"), list(data)

    def chat_logprobs(self, outs) -> dict:
        content = []
        for o in outs:
            s, b = self.token_str(o.token)
            top = [dict(zip(("token", "bytes"), self.token_str(t)), logprob=lp) for t, lp in (o.top or [])]
            content.append({"token": s, "logprob": o.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, outs, offset: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        for o in outs:
            s, _ = self.token_str(o.token)
            tokens.append(s)
            lps.append(o.logprob)
            tops.append({self.token_str(t)[0]: lp for t, lp in (o.top or [])} if o.top is not None else None)
            offs.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def create_app(engine: Engine | RemoteEngine, model_name: str, api_keys: list[str] | None = None, metrics=None,
               builtin_tools: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               prepare_timeout_s: float = 5.0) -> FastAPI:
    srv = Server(engine, model_name, api_keys, metrics, builtin_tools, max_request_bytes, prepare_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        freeze_heap()
        yield
        engine.stop()

    app = FastAPI(title="berrylm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    def error(e: APIError, endpoint: str = "") -> JSONResponse:
        if metrics is not None and endpoint:
            metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            try:
                srv.check_auth(request)
            except APIError as e:
                return error(e, request.url.path)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error(_validation_error(e.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error(APIError(500, "internal server error", "server_error"), request.url.path)

    @app.get("/health")
    async def health(probe: str = "ready"):
        """Readiness (default) and, with ?probe=live, liveness: both fail when the engine died (the body says
        whether it is restarting: serve/engine_process.py); only readiness fails while draining after SIGTERM
        (serve/shutdown.py), so a long drain is not cut short by a restart."""
        if hasattr(engine, "health"):
            state = engine.health()
        else:
            state = {"status": "ok"} if getattr(engine, "alive", True) else {
                "status": "error", "message": "the engine process is not running"}
        if state["status"] != "ok":
            return JSONResponse(state, 503)
        if probe != "live" and getattr(app.state, "draining", False):
            return JSONResponse({"status": "draining", "message": "shutting down; finishing in-flight requests"},
                                503)
        return state

    @app.get("/metrics")
    async def get_metrics():
        if metrics is None:
            return Response("", media_type="text/plain")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "berrylm", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await read_body(request, srv.max_request_bytes)
        p = await srv.bounded.run(srv.prepare_chat, raw)
        body, prompt, parse = p.body, p.prompt, p.parse
        rid, q = srv.submit(prompt, p.params, body.n, p.tools, p.guide)
        cid, created = f"chatcmpl-{rid}", int(time.time())
        head = {"id": cid, "created": created, "model": model_name, "system_fingerprint": None}
        if metrics is not None:
            metrics.requests.labels("/v1/chat/completions", "200").inc()
        if body.stream:
            usage_on = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(srv, rid, q, body.n, request, head, len(prompt), usage_on, parse),
                                     media_type="text/event-stream")
        agg = ChoiceAggregator(body.n, len(prompt), parse)
        async for d in srv.deltas(rid, q, body.n, request):
            agg.add(d)
        if agg.failed:
            raise engine_failed(agg.failed)

        def build() -> str:  # on a worker thread: n=16 x top_logprobs=20 is a 20 MB body
            choices = chat_choices(agg, lambda outs: srv.chat_logprobs(outs) if body.logprobs else None)
            return dumps({**head, "object": "chat.completion", "choices": choices, "usage": agg.usage()})

        return Response(await asyncio.to_thread(build), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, srv.max_request_bytes)
        p = await srv.bounded.run(srv.prepare_completion, raw)
        body, prompt, echo = p.body, p.prompt, p.echo
        rid, q = srv.submit(prompt, p.params, body.n)
        head = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": model_name, "system_fingerprint": None}
        if metrics is not None:
            metrics.requests.labels("/v1/completions", "200").inc()
        if body.stream:
            usage_on = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(completion_stream(srv, rid, q, body.n, request, head, len(prompt), usage_on,
                                                       echo, body.logprobs is not None),
                                     media_type="text/event-stream")
        agg = ChoiceAggregator(body.n, len(prompt), echo=echo)
        async for d in srv.deltas(rid, q, body.n, request):
            agg.add(d)
        if agg.failed:
            raise engine_failed(agg.failed)

        def build() -> str:
            choices = [{"index": i, "text": agg.text[i], "finish_reason": agg.reasons[i],
                        "logprobs": srv.completion_logprobs(agg.logprobs[i], len(echo)) if body.logprobs is not None
                        else None} for i in range(body.n)]
            return dumps({**head, "object": "text_completion", "choices": choices, "usage": agg.usage()})

        return Response(await asyncio.to_thread(build), media_type="application/json")

    return app

