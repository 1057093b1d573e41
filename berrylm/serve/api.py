"""The OpenAI-compatible HTTP app (FastAPI): chat and text completions, models, health and metrics here; the
Responses API (serve/responses_api.py) and the token utilities (serve/tokenize_api.py) register their routes on it.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses   GET /v1/models
    POST /tokenize   POST /detokenize   GET /health   GET /metrics
Errors are always {"error": {"message", "type", "param", "code"}}; a pydantic validation error becomes a 400 naming
the parameter (serve/server.py). With --api-key, /v1/* (and /tokenize, /detokenize) need `Authorization: Bearer
KEY`; /health and /metrics stay open. A body over --max-request-bytes is a 413; parsing, the chat template and
tokenization run on a thread with a time bound (serve/guard.py, serve/prepare.py), and a prompt that cannot fit the
context is refused by its length in characters before it is tokenized, so no body can stall the event loop that
streams everyone's tokens. Several models: `model` picks one (serve/models.py), each with its own engine.
Browser and proxy options (serve/http_options.py): CORS origins, SSE keep-alive comments, X-Request-Id.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from berrylm.serve.guard import DEFAULT_MAX_REQUEST_BYTES, dumps, freeze_heap, read_body
from berrylm.serve.http_options import HttpOptions, install
from berrylm.serve.models import ModelRegistry, ServedModel
from berrylm.serve.prepare import prepare_chat, prepare_completion
from berrylm.serve.protocol import APIError
from berrylm.serve.responses import ChoiceAggregator, chat_choices, chat_stream, completion_stream, engine_failed
from berrylm.serve.server import Server, validation_error


def create_app(models: ModelRegistry | list[ServedModel], api_keys: list[str] | None = None, metrics=None,
               builtin_tools: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               prepare_timeout_s: float = 5.0, http: HttpOptions | None = None) -> FastAPI:
    """metrics: serve.metrics.Metrics (its series labelled by model) or None."""
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry(list(models))
    srv = Server(registry, api_keys, metrics, builtin_tools, max_request_bytes, prepare_timeout_s)
    http = http or HttpOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in registry.engines():
            engine.start()
        freeze_heap()
        yield
        for engine in registry.engines():
            engine.stop()

    app = FastAPI(title="berrylm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    def error(e: APIError, endpoint: str = "") -> JSONResponse:
        if metrics is not None and endpoint:
            metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            try:
                srv.check_auth(request)
            except APIError as e:
                return error(e, path)
        return await call_next(request)

    install(app, http)  # outermost: CORS preflights and request ids wrap even the auth middleware's answers

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error(validation_error(e.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error(APIError(500, "internal server error", "server_error"), request.url.path)

    @app.get("/health")
    async def health(probe: str = "ready"):
        """Readiness (default) and, with ?probe=live, liveness: both fail when an engine died (the body says
        whether it is restarting: serve/engine_process.py); only readiness fails while draining after SIGTERM
        (serve/shutdown.py), so a long drain is not cut short by a restart. With several models the body has
        each one's state under "models" and the top level is the worst of them."""
        states = {m.name: m.health() for m in registry.models.values()}
        bad = [s for s in states.values() if s["status"] != "ok"]
        state = dict(bad[0] if bad else next(iter(states.values())))
        if len(states) > 1:
            state["models"] = states
        if bad:
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
    async def list_models(request: Request):
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": r.model.created, "owned_by": "berrylm",
             "max_model_len": r.model.max_model_len} for name, r in registry.routes.items()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await read_body(request, srv.max_request_bytes)
        p = await srv.bounded.run(prepare_chat, srv, raw)
        body, model = p.body, p.model
        rids, q = srv.submit(model, p.requests(), body.n)
        cid, created = f"chatcmpl-{rids[0]}", int(time.time())
        head = {"id": cid, "created": created, "model": model.name, "system_fingerprint": None}
        if metrics is not None:
            metrics.requests.labels("/v1/chat/completions", "200").inc()
        agg = ChoiceAggregator(body.n, len(p.prompt), p.parse)
        deltas = srv.deltas(model, rids, q, body.n, request, ping=http.sse_ping_interval if body.stream else 0)
        logprobs_of = lambda outs: srv.chat_logprobs(model, outs) if body.logprobs else None  # noqa: E731
        if body.stream:
            usage_on = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(deltas, agg, head, usage_on, logprobs_of),
                                     media_type="text/event-stream")
        async for d in deltas:
            agg.add(d)
        if agg.failed:
            raise engine_failed(agg.failed)

        def build() -> str:  # on a worker thread: n=16 x top_logprobs=20 is a 20 MB body
            choices = chat_choices(agg, logprobs_of)
            return dumps({**head, "object": "chat.completion", "choices": choices, "usage": agg.usage()})

        return Response(await asyncio.to_thread(build), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, srv.max_request_bytes)
        p = await srv.bounded.run(prepare_completion, srv, raw)
        body, model, n = p.body, p.model, p.body.n
        total = n * len(p.prompts)
        rids, q = srv.submit(model, p.requests(), n)
        head = {"id": f"cmpl-{rids[0]}", "created": int(time.time()), "model": model.name,
                "system_fingerprint": None}
        if metrics is not None:
            metrics.requests.labels("/v1/completions", "200").inc()
        prompt_of = [p.prompts[i // n] for i in range(total)]
        echo = [p.echo[i // n] for i in range(total)] if p.echo else ""
        agg = ChoiceAggregator(total, [len(x) for x in prompt_of], echo=echo, n_per_prompt=n)
        deltas = srv.deltas(model, rids, q, total, request, n, ping=http.sse_ping_interval if body.stream else 0)
        want = body.logprobs is not None

        def logprobs_of(i: int, outs, offset: int, prompt_lps) -> dict | None:
            if not want:
                return None
            if prompt_lps is not None or (echo and offset == 0 and not outs):
                return srv.completion_logprobs(model, outs, 0, prompt_of[i], prompt_lps)
            return srv.completion_logprobs(model, outs, offset)

        if body.stream:
            usage_on = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(completion_stream(deltas, agg, head, usage_on, logprobs_of),
                                     media_type="text/event-stream")
        async for d in deltas:
            agg.add(d)
        if agg.failed:
            raise engine_failed(agg.failed)

        def build() -> str:
            choices = []
            for i in range(total):
                lp = None
                if want:
                    lp = srv.completion_logprobs(model, agg.logprobs[i], len(echo[i]) if echo else 0,
                                                 prompt_of[i] if echo else None, agg.prompt_logprobs[i])
                choices.append({"index": i, "text": agg.text[i], "finish_reason": agg.reasons[i], "logprobs": lp})
            return dumps({**head, "object": "text_completion", "choices": choices, "usage": agg.usage()})

        return Response(await asyncio.to_thread(build), media_type="application/json")

    from berrylm.serve.responses_api import register as register_responses
    from berrylm.serve.tokenize_api import register as register_tokenize

    register_tokenize(app, srv)
    register_responses(app, srv, http)
    return app
