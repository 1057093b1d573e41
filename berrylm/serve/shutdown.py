"""Graceful shutdown of `berry serve`: readiness fails first, in-flight streams finish, then the process exits 0.

    SIGTERM / Ctrl-C   -> app.state.draining = True: GET /health answers 503 "draining" (GET /health?probe=live
                          stays 200), requests are still accepted and served for `drain_delay` seconds, so a load
                          balancer or Kubernetes takes the replica out of rotation before it stops listening
    after drain_delay  -> uvicorn's shutdown: close the listening socket, let in-flight responses (SSE streams
                          included) finish for at most config.timeout_graceful_shutdown seconds, stop the engine
    a second signal    -> skip what is left of the delay; a third Ctrl-C stops without waiting for streams
The engine process ignores SIGTERM and SIGINT (serve/engine_process.py): a signal sent to the whole process group
must not stop the engine under the streams being drained; the HTTP process stops it last.
"""

from __future__ import annotations

import time
from types import FrameType

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_delay: float = 0.0):
        super().__init__(config)
        self.drain_delay = drain_delay
        self.stop_at: float | None = None  # monotonic time the listening socket closes, once draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.draining = True
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.drain_delay
        else:  # uvicorn's own handling: stop now, and a further Ctrl-C forces exit
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.should_exit = True
        return await super().on_tick(counter)
