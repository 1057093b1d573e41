"""The engine in its own process, so the model's step loop and the HTTP event loop stop sharing one GIL.

    parent (uvicorn, serve/api.py)                         child ("berry-engine", spawned)
    RemoteEngine.add_request(...)  ---("add", ...)------>  Engine.add_request(sink=outbox.append)
    RemoteEngine.abort(rid)        ---("abort", rid)---->  Engine.abort(rid)
    reader thread: sink(Delta)     <--(deltas, metric events)--  once per engine step
RemoteEngine has the part of Engine's interface the HTTP layer uses (tokenizer, token_bytes, max_model_len,
add_request, abort, start, stop), so create_app takes either. The child loads the model itself (spawn: no
forked torch or CUDA state); the parent keeps a copy only for its tokenizer. Metrics hooks run in the child as
MetricEvents, which the parent replays into its Prometheus registry.

If the engine process dies (killed, out of memory, a crash in native code), the parent logs it with the exit
code, ends every open request with finish_reason "engine_died" (the API answers code `engine_died`), and restarts
the engine process after a backoff (1 s, 2 s, 4 s, ...). While it restarts, `health()` says "restarting" (/health
is a 503) and new requests get a 503 `engine_restarting`. More than `max_restarts` deaths within 10 minutes: it
gives up, `health()` says "failed" and `on_failed` runs (`berry serve` then shuts down and exits with code 3, so
a supervisor such as systemd, Docker or Kubernetes restarts the whole server).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from berrylm.serve.config import EngineConfig, QueueFull, context_budget
from berrylm.serve.sequence import Delta

log = logging.getLogger("berry.engine")
ENGINE_DIED = "engine_died"  # finish_reason of the choices open when the engine process died
RESTART_WINDOW_S = 600.0


class EngineDown(QueueFull):
    """The engine process is not running (restarting, or given up); `code` says which."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class ModelSpec:
    """How the child loads the model: serve.backend.load_backend's arguments, and its CPU threads."""
    model: str | None
    backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 1
    quantize: str = "none"
    load_foreign: Callable[[Path], tuple] | None = None  # a module-level function (pickled by name for spawn)


class MetricEvents:
    """berrylm.serve.metrics.Metrics' engine hooks, recorded in the child for the parent to replay."""

    def __init__(self):
        self.events: list[tuple] = []
        self.waiting = 0

    def on_step(self, engine) -> None:
        b = engine.blocks
        self.waiting = engine.num_waiting()
        self.events.append(("step", self.waiting, engine.num_running(), b.usage(), engine.scheduler.preemptions,
                            b.hits / b.queries if b.queries else None, engine.last_batch))

    def on_token(self, seq, now: float) -> None:
        if seq.last_emit is None:
            self.events.append(("first", now - seq.arrival, len(seq.prompt)))
        else:
            self.events.append(("next", now - seq.last_emit))

    def on_finish(self, seq) -> None:
        self.events.append(("finish", seq.finish_reason))

    def take(self) -> list[tuple]:
        out, self.events = self.events, []
        return out


def _child(conn, spec: ModelSpec, config: EngineConfig) -> None:
    """The engine process: load, report ready, then run the engine thread and relay commands to it."""
    import signal
    import sys

    # the parent stops the engine ("stop", or its end of the pipe closing) once in-flight requests are drained: a
    # SIGTERM or Ctrl-C sent to the whole process group must not kill it under them (serve/shutdown.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    import torch

    from berrylm.serve.backend import load_backend
    from berrylm.serve.confine import no_dump
    from berrylm.serve.engine import Engine

    no_dump()
    torch.set_num_threads(spec.threads)
    sys.setswitchinterval(0.001)
    events = MetricEvents()
    try:
        backend = load_backend(spec.model, spec.backend, spec.device, spec.dtype, spec.quantize, spec.load_foreign)
        engine = Engine(backend, config, events)
    except Exception as e:  # the parent loaded the same model, so this is rare (e.g. out of memory)
        from berrylm.model.config import ModelFileError

        conn.send(("failed", str(e) if isinstance(e, ModelFileError) else f"{type(e).__name__}: {e}",
                   isinstance(e, ModelFileError)))
        return
    outbox: list[Delta] = []
    send_lock = threading.Lock()

    def flush() -> None:  # engine thread, after every step
        if outbox or events.events:
            batch, outbox[:] = list(outbox), []
            with send_lock:
                conn.send(("deltas", batch, events.take(), events.waiting))

    engine.after_step = flush
    gc.collect()  # as serve/guard.py's freeze_heap: start-up objects leave the collector's walk (no 100 ms pauses)
    gc.freeze()
    engine.start()
    notes = (f"quantize {getattr(backend, 'quantize', 'none')} ({getattr(backend, 'quantize_note', 'as asked')})",
             engine.kv_note)
    conn.send(("ready", str(backend.device), str(backend.dtype).removeprefix("torch."), engine.max_model_len, notes))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "add":
                _, prompt, params, n, rid, tools, guide = msg
                try:
                    engine.add_request(prompt, params, n, outbox.append, request_id=rid, tools=tools, guide=guide)
                except (ValueError, QueueFull) as e:
                    with send_lock:
                        conn.send(("rejected", rid, n, str(e)))
            elif msg[0] == "abort":
                engine.abort(msg[1])
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):  # the parent went away
        pass
    engine.stop()


class RemoteEngine:
    """The parent's handle on the engine process (see the module docstring)."""

    def __init__(self, backend, spec: ModelSpec, config: EngineConfig | None = None, metrics=None,
                 max_restarts: int = 3, on_failed=None):
        """backend: the model loaded in this process, for its tokenizer and config (the child loads its own).
        max_restarts: engine deaths within 10 minutes that are restarted; on_failed: called (from a thread) when
        one more death gives up."""
        self.config, self.metrics, self.spec = config or EngineConfig(), metrics, spec
        cfg = backend.cfg
        self.tokenizer = backend.tokenizer
        self.max_model_len = min(self.config.max_model_len or cfg.max_seq_len, cfg.max_seq_len)
        from berrylm.serve.detokenizer import token_bytes_table

        self.token_bytes = token_bytes_table(self.tokenizer)
        self._sinks: dict[str, list] = {}  # request id -> [sink, choices not finished]
        self._lock = threading.Lock()
        self._waiting = 0  # the child's queue depth at its last step, plus what was sent since
        self._proc = None
        self._conn = None
        self.device = self.dtype = ""  # where the engine process runs the model, once started
        self.notes: tuple[str, ...] = ()  # the engine's lines for the start-up log (quantization, KV sizing)
        self._reader: threading.Thread | None = None
        self.max_restarts, self.on_failed = max_restarts, on_failed
        self.state = "stopped"  # "ok" | "restarting" | "failed" | "stopped"
        self.restarts = 0
        self._deaths: list[float] = []
        self._stopping = False

    def start(self) -> None:
        if self._proc is not None:
            return
        self._stopping = False
        self._spawn()
        self.state = "ok"

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        # the parent enforces the queue limit (add_request must answer at once); the child never rejects
        config = EngineConfig(**{**self.config.__dict__, "max_waiting": 1 << 30})
        proc = ctx.Process(target=_child, args=(child, self.spec, config), name="berry-engine", daemon=True)
        proc.start()
        child.close()
        try:
            msg = conn.recv()
        except EOFError:
            proc.join(timeout=5)
            msg = ("failed", f"it exited with code {proc.exitcode}")
        if msg[0] != "ready":
            proc.join(timeout=5)
            from berrylm.model.config import ModelFileError

            error = ModelFileError if len(msg) > 2 and msg[2] else ValueError  # a model file it cannot load: exit 2
            raise error(f"the engine process could not start: {msg[1]}")
        with self._lock:
            self._proc, self._conn, self._waiting = proc, conn, 0
        self.device, self.dtype, self.max_model_len, self.notes = msg[1], msg[2], msg[3], msg[4]
        self._reader = threading.Thread(target=self._read, args=(proc, conn), name="berry-engine-reader", daemon=True)
        self._reader.start()

    def health(self) -> dict:
        if self.state == "ok":
            return {"status": "ok", "engine_restarts": self.restarts}
        msgs = {"restarting": "the engine process died and is being restarted",
                "failed": "the engine process died too often; the server is shutting down",
                "stopped": "the engine is not running"}
        return {"status": self.state, "message": msgs[self.state], "engine_restarts": self.restarts}

    def _died(self, proc) -> None:
        """The reader saw the engine process go: log, fail open requests, then restart or give up."""
        proc.join(timeout=5)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        log.error("the engine process (pid %s) died with exit code %s; %d open request(s) ended with engine_died",
                  proc.pid, proc.exitcode, len(self._sinks))
        with self._lock:
            self._proc = None
        self._fail_all()
        if len(self._deaths) > self.max_restarts:
            self.state = "failed"
            log.critical("the engine process died %d times within %.0f s; giving up", len(self._deaths),
                         RESTART_WINDOW_S)
            if self.on_failed is not None:
                self.on_failed()
            return
        self.state = "restarting"
        delay = 2.0 ** (len(self._deaths) - 1)
        threading.Thread(target=self._restart, args=(delay,), name="berry-engine-restart", daemon=True).start()

    def _restart(self, delay: float) -> None:
        time.sleep(delay)
        if self._stopping:
            return
        try:
            self._spawn()
        except Exception as e:  # noqa: BLE001 - counts as one more death
            log.error("restarting the engine process failed: %s", e)
            self._died(_Gone())
            return
        self.restarts += 1
        self.state = "ok"
        log.warning("the engine process was restarted (restart %d)", self.restarts)

    def stop(self) -> None:
        self._stopping = True
        self.state = "failed" if self.state == "failed" else "stopped"
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None

    def add_request(self, prompt: list[int], params, n: int = 1, sink=None, request_id: str | None = None,
                    tools=None, guide=None) -> str:
        """As Engine.add_request; guide must be picklable (a class or functools.partial, not a lambda)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        context_budget(len(prompt), None, self.max_model_len)
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            if not self.alive:
                if self.state == "restarting":
                    raise EngineDown("the engine process died and is being restarted; retry shortly",
                                     "engine_restarting")
                raise EngineDown("the engine process is not running", ENGINE_DIED)
            if self._waiting >= self.config.max_waiting:
                raise QueueFull("the server is at capacity; retry later")
            try:
                self._conn.send(("add", prompt, params, n, rid, tools, guide))
            except OSError:
                raise QueueFull("the engine process is not running") from None
            self._waiting += n
            self._sinks[rid] = [sink, n]
        return rid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._sinks.pop(request_id, None) is not None and self.alive:  # nothing more is delivered to it
                self._conn.send(("abort", request_id))

    def _read(self, proc, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._died(proc)
                return
            if msg[0] == "rejected":
                _, rid, n, why = msg
                self._deliver([Delta(rid, i, finish_reason="error") for i in range(n)])
                continue
            _, deltas, events, waiting = msg
            with self._lock:
                self._waiting = waiting
            if self.metrics is not None and events:
                self.metrics.replay(events)
            self._deliver(deltas)

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            with self._lock:
                entry = self._sinks.get(d.request_id)
                if entry is not None and d.finish_reason is not None:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._sinks[d.request_id]
            if entry is not None and entry[0] is not None:
                entry[0](d)

    def _fail_all(self) -> None:
        """The engine process died: finish every open request with an error instead of leaving it hanging."""
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for rid, (sink, n) in sinks.items():
            for i in range(n):
                if sink is not None:
                    sink(Delta(rid, i, finish_reason=ENGINE_DIED))


class _Gone:
    """Stands for an engine process that never started (a failed restart counts as a death)."""
    pid, exitcode = None, None

    def join(self, timeout=None) -> None:
        pass
