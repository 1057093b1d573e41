"""Browser and proxy friendliness: CORS, SSE keep-alive comments, request ids in responses and the access log.

    --cors-origin ORIGIN (repeatable)  browsers on those origins may call the API (preflights answered, the
                                       Authorization header allowed); none by default, `*` for any
    --sse-ping-interval S              a stream idle for S seconds gets an SSE comment line (": ping"), which
                                       clients ignore and proxies count as traffic (default 15; 0: off); a timer
                                       on the request's delta queue (serve/server.py: Server.deltas), reset by
                                       every delta, so a busy stream pays nothing for it
    X-Request-Id                       echoed on every response, made up (32 hex digits) when the request has none,
                                       and written with the request's access-log line (--access-log: one line per
                                       request on stdout, logger berry.access)
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI

access_log = logging.getLogger("berry.access")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # an id we echo and log: no spaces, quotes or newlines


PING = ": ping\n\n"  # an SSE comment line: clients skip it, proxies count it as traffic


@dataclass
class HttpOptions:
    cors_origins: list[str] = field(default_factory=list)
    sse_ping_interval: float = 15.0
    access_log: bool = False


class RequestIdMiddleware:
    """Plain ASGI (no per-chunk cost on streams, unlike Starlette's BaseHTTPMiddleware): puts X-Request-Id on the
    response head and writes the access-log line when the head goes out."""

    def __init__(self, app, log: bool):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                given = v.decode("latin-1")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                if self.log:
                    client = scope.get("client") or ("-", 0)
                    access_log.info('%s "%s %s" %d %.1fms request_id=%s', client[0], scope["method"], scope["path"],
                                    message["status"], (time.perf_counter() - t0) * 1e3, rid)
            await send(message)

        await self.app(scope, receive, send_with_id)


def install(app: FastAPI, http: HttpOptions) -> None:
    """Add the request-id / access-log middleware and, with origins, CORS (outermost, so preflights never need a
    key)."""
    if http.access_log and not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    app.add_middleware(RequestIdMiddleware, log=http.access_log)
    if http.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=http.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"], max_age=600)
