"""Browser and proxy friendliness: CORS, SSE keep-alive comments, request ids in responses and the access log.

    --cors-origin ORIGIN (repeatable)  browsers on those origins may call the API (preflights answered, the
                                       Authorization header allowed); none by default, `*` for any
    --sse-ping-interval S              a stream idle for S seconds gets an SSE comment line (": ping"), which
                                       clients ignore and proxies count as traffic (default 15; 0: off)
    X-Request-Id                       echoed on every response, made up (32 hex digits) when the request has none,
                                       and written with the request's access-log line (--access-log: one line per
                                       request on stdout, logger berry.access)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request

access_log = logging.getLogger("berry.access")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # an id we echo and log: no spaces, quotes or newlines


@dataclass
class HttpOptions:
    cors_origins: list[str] = field(default_factory=list)
    sse_ping_interval: float = 15.0
    access_log: bool = False

    async def keepalive(self, stream):
        """Pass an SSE stream through, adding a comment line whenever it has been quiet for the ping interval."""
        if not self.sse_ping_interval or self.sse_ping_interval <= 0:
            async for item in stream:
                yield item
            return
        it = stream.__aiter__()
        pending = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=self.sse_ping_interval)
                if not done:
                    yield ": ping\n\n"
                    continue
                task, pending = pending, None
                try:
                    item = task.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:  # the client went away (or the stream ended): stop the inner stream so it aborts its requests
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            with contextlib.suppress(BaseException):
                await it.aclose()


def install(app: FastAPI, http: HttpOptions) -> None:
    """Add the request-id / access-log middleware and, with origins, CORS (outermost, so preflights never need a
    key)."""
    if http.access_log and not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False

    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        if http.access_log:
            client = request.client.host if request.client else "-"
            access_log.info('%s "%s %s" %d %.1fms request_id=%s', client, request.method, request.url.path,
                            response.status_code, (time.perf_counter() - t0) * 1e3, rid)
        return response

    if http.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=http.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"], max_age=600)
