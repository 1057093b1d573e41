"""The engine in its own process, so the model's step loop and the HTTP event loop stop sharing one GIL.

    parent (uvicorn, serve/api.py)                         child ("berry-engine", spawned)
    RemoteEngine.add_request(...)  ---("add", ...)------>  Engine.add_request(sink=outbox.append)
    RemoteEngine.abort(rid)        ---("abort", rid)---->  Engine.abort(rid)
    reader thread: sink(Delta)     <--(deltas, metric events)--  once per engine step
RemoteEngine has the part of Engine's interface the HTTP layer uses (tokenizer, token_bytes, max_model_len,
add_request, abort, start, stop), so create_app takes either. The child loads the model itself (spawn: no
forked torch or CUDA state); the parent keeps a copy only for its tokenizer. Metrics hooks run in the child as
MetricEvents, which the parent replays into its Prometheus registry.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from berrylm.serve.engine import EngineConfig, QueueFull, context_budget
from berrylm.serve.sequence import Delta


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
    from berrylm.serve.engine import Engine

    torch.set_num_threads(spec.threads)
    sys.setswitchinterval(0.001)
    events = MetricEvents()
    try:
        backend = load_backend(spec.model, spec.backend, spec.device, spec.dtype, spec.quantize, spec.load_foreign)
        engine = Engine(backend, config, events)
    except Exception as e:  # the parent loaded the same model, so this is rare (e.g. out of memory)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    outbox: list[Delta] = []
    send_lock = threading.Lock()

    def flush() -> None:  # engine thread, after every step
        if outbox or events.events:
            batch, outbox[:] = list(outbox), []
            with send_lock:
                conn.send(("deltas", batch, events.take(), events.waiting))

    engine.after_step = flush
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

    def __init__(self, backend, spec: ModelSpec, config: EngineConfig | None = None, metrics=None):
        """backend: the model loaded in this process, for its tokenizer and config (the child loads its own)."""
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

    def start(self) -> None:
        if self._proc is not None:
            return
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # the parent enforces the queue limit (add_request must answer at once); the child never rejects
        config = EngineConfig(**{**self.config.__dict__, "max_waiting": 1 << 30})
        self._proc = ctx.Process(target=_child, args=(child, self.spec, config), name="berry-engine", daemon=True)
        self._proc.start()
        child.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = ("failed", f"it exited with code {self._proc.exitcode}")
        if msg[0] != "ready":
            self._proc.join(timeout=5)
            self._proc = None
            raise ValueError(f"the engine process could not start: {msg[1]}")
        self.device, self.dtype, self.max_model_len, self.notes = msg[1], msg[2], msg[3], msg[4]
        self._reader = threading.Thread(target=self._read, name="berry-engine-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
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
                raise QueueFull("the engine process is not running")
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

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._fail_all()
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
                    sink(Delta(rid, i, finish_reason="error"))
