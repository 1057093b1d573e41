"""The continuous-batching engine: a step loop over sequences, run in a background thread.

    add_request(prompt ids, params, n, sink)   from any thread; sink(Delta) is called from the engine thread
    abort(request_id)                          from any thread; frees the request's blocks at the next step
    step()                                     schedule -> one batched decode forward + prefill chunks ->
                                               one batched sample -> detokenize, check stops, report
The HTTP layer (serve/api.py) wraps sink in loop.call_soon_threadsafe onto a per-request asyncio queue.
Built-in tools (serve/tools/builtin.py): a sequence that closes a calculator call is paused, the call runs on a
tool thread, and the result's tokens are appended to the sequence (one prefill) when it comes back.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from berrylm.model.toolcall import after_call_text
from berrylm.serve.backend import Backend
from berrylm.serve.detokenizer import Detokenizer, token_bytes_table
from berrylm.serve.json_guide import JsonGuide
from berrylm.serve.kv_cache import BlockManager, KVPool, PagedBatch, plan_kv
from berrylm.serve.sampler import SampleOut, SamplingParams, sample_batch
from berrylm.serve.scheduler import Scheduler, Sequence
from berrylm.serve.tools.builtin import BuiltinTools, ToolEvent, ToolOptions
from berrylm.serve.tools.openai_tools import MarkerDetokenizer


class QueueFull(RuntimeError):
    pass


@dataclass
class Delta:
    """What one sequence produced in one step."""
    request_id: str
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[SampleOut] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the model generated
    cached_tokens: int = 0
    tool_events: list[ToolEvent] = field(default_factory=list)  # built-in calls finished (result back)


@dataclass
class EngineConfig:
    max_batch: int = 32
    max_model_len: int | None = None  # default: the model's max_seq_len
    block_size: int = 16
    kv_cache_mb: float | None = None  # budget for K/V blocks (default: see serve.kv_cache.plan_kv)
    num_blocks: int | None = None
    prefill_chunk: int = 512
    max_waiting: int = 256
    prefix_caching: bool = True
    max_tool_rounds: int = 3  # built-in tool calls per request
    tool_timeout_s: float = 1.0


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig | None = None, metrics=None):
        self.backend, self.config, self.metrics = backend, config or EngineConfig(), metrics
        c, cfg = self.config, backend.cfg
        self.tokenizer = backend.tokenizer
        num_blocks, self.max_model_len, self.kv_note = plan_kv(cfg, c.block_size, backend.dtype, c.max_model_len,
                                                              c.kv_cache_mb, c.num_blocks)
        # hybrids: no prefix reuse (the linear heads' state at a block boundary is not snapshotted)
        prefix = c.prefix_caching and cfg.n_linear_heads == 0
        self.pool = KVPool(cfg, num_blocks, c.block_size, c.max_batch, backend.device, backend.dtype)
        self.blocks = BlockManager(num_blocks, c.block_size, prefix)
        self.scheduler = Scheduler(self.blocks, c.max_batch, c.prefill_chunk, self.pool.reset_slot)
        self.eos = set(self.tokenizer.eos_ids)
        self.token_bytes = token_bytes_table(self.tokenizer)
        self._inbox: deque = deque()
        self._aborts: deque = deque()
        self._tool_results: deque = deque()  # (sequence, ToolEvent) from the tool thread
        self._tools_pending = 0
        self.tools = BuiltinTools(c.max_tool_rounds, c.tool_timeout_s)
        self.tool_open, self.tool_close = self.tokenizer.tool_call_id, self.tokenizer.tool_call_end_id
        self._by_request: dict[str, list[Sequence]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._rid = itertools.count()
        self.steps = 0
        self.last_batch = 0
        self.after_step = None  # called on the engine thread after each step (serve/engine_process.py)

    # --- requests (any thread) ---
    def add_request(self, prompt: list[int], params: SamplingParams, n: int = 1, sink=None,
                    request_id: str | None = None, tools: ToolOptions | None = None, guide=None) -> str:
        """tools: built-in tool use / call markers in the text; guide: a token constraint with JsonGuide's interface
        (allows, allowed_mask, advance) or a callable making one per choice, instead of the json_mode guide."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len}")
        if self.num_waiting() + len(self._inbox) >= self.config.max_waiting:
            raise QueueFull("the server is at capacity; retry later")
        rid = request_id or f"req-{next(self._rid)}"
        seqs = []
        for i in range(n):
            p = params if n == 1 else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            s = Sequence(rid, i, list(prompt), p, sink, leader=seqs[0] if seqs else None, tools=tools)
            if tools is not None and tools.markers:
                s.detok = MarkerDetokenizer(self.tokenizer, p.stop, {self.tool_open, self.tool_close})
            else:
                s.detok = Detokenizer(self.tokenizer, p.stop, p.skip_special_tokens)
            if guide is not None:
                s.guide = guide() if callable(guide) else guide
            else:
                s.guide = JsonGuide(self.token_bytes, self.tokenizer.eos_ids) if p.json_mode else None
            seqs.append(s)
        with self._wake:
            self._inbox.append(seqs)
            self._wake.notify()
        return rid

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_work(self) -> bool:
        """Something a step can do now (sequences paused on a tool do not count; see `tools_pending`)."""
        sch = self.scheduler
        return bool(self._inbox or self._aborts or self._tool_results or any(not s.paused for s in sch.running)
                    or any(not s.paused for s in sch.waiting))

    def tools_pending(self) -> int:
        return self._tools_pending

    # --- the step ---
    def _drain(self) -> None:
        with self._wake:
            inbox, aborts, results = list(self._inbox), list(self._aborts), list(self._tool_results)
            self._inbox.clear()
            self._aborts.clear()
            self._tool_results.clear()
        for seqs in inbox:
            self._by_request[seqs[0].request_id] = seqs
            self.scheduler.waiting.extend(seqs)
        for rid in aborts:
            for s in self._by_request.pop(rid, []):
                if not s.finished:
                    s.finished, s.finish_reason = True, "abort"
                    self.scheduler.free(s)
                    if s in self.scheduler.waiting:
                        self.scheduler.waiting.remove(s)
                    if self.metrics is not None:
                        self.metrics.on_finish(s)
        for s, ev in results:
            self._tools_pending -= 1
            if not s.finished:
                self._resume(s, ev)

    # --- built-in tools ---
    def _start_tool(self, s: Sequence, body: str) -> None:
        """Pause s and run the call off this thread; the result comes back through _tool_results."""
        s.paused = True
        self._tools_pending += 1
        rounds, s.tool_rounds = s.tool_rounds, s.tool_rounds + 1

        def done(ev: ToolEvent) -> None:
            with self._wake:
                self._tool_results.append((s, ev))
                self._wake.notify()

        self.tools.run(body, rounds, done)

    def _resume(self, s: Sequence, ev: ToolEvent) -> None:
        """Append the tool turn (prefilled in one chunk by the next steps) and let s decode again."""
        ids = self.tokenizer.encode(after_call_text(ev.output))
        s.paused = False
        reason = None
        if s.length + len(ids) >= self.max_model_len:
            reason = "length"  # no room left to read the result and answer
        else:
            s.output += ids
            s.n_injected += len(ids)
        d = Delta(s.request_id, s.index, "", [], [], reason, len(s.prompt) + s.n_injected, s.n_generated,
                  s.cached_tokens, [ev])
        if reason is not None:
            d.text = s.detok.flush()
            self._finish(s, reason)
        if s.sink is not None:
            s.sink(d)

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finished, s.finish_reason = True, reason
        self.scheduler.free(s)
        if s in self.scheduler.waiting:
            self.scheduler.waiting.remove(s)
        sibs = self._by_request.get(s.request_id, [])
        if all(x.finished for x in sibs):
            self._by_request.pop(s.request_id, None)
        if self.metrics is not None:
            self.metrics.on_finish(s)

    @torch.inference_mode()
    def step(self) -> int:
        """Run one step; returns the number of sequences that computed something."""
        self._drain()
        plan = self.scheduler.schedule()
        dev = self.backend.device
        sampled_seqs, rows = [], []
        if plan.decode:
            seqs = plan.decode
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
            batch = PagedBatch(self.pool, [s.table for s in seqs], [s.num_computed for s in seqs], 1,
                               [s.slot for s in seqs])
            logits = self.backend.forward(tokens, batch)[:, -1]  # [B, V]
            for s in seqs:
                s.num_computed += 1
            sampled_seqs += seqs
            rows.append(logits)
        # prefill: one padded forward for all chunks (pure softmax models), one per chunk for hybrids (padding
        # tokens would enter the linear heads' recurrent state)
        groups = [plan.prefill] if self.backend.cfg.n_linear_heads == 0 else [[x] for x in plan.prefill]
        for group in groups:
            if not group:
                continue
            T = max(n for _, n in group)
            toks = [s.tokens[s.num_computed:s.num_computed + n] for s, n in group]
            tokens = torch.tensor([t + [0] * (T - len(t)) for t in toks], device=dev)
            batch = PagedBatch(self.pool, [s.table for s, _ in group], [s.num_computed for s, _ in group], T,
                               [s.slot for s, _ in group], [n for _, n in group])
            logits = self.backend.forward(tokens, batch)  # [B, T, V]
            for i, (s, n) in enumerate(group):
                s.num_computed += n
                if s.remaining == 0:
                    sampled_seqs.append(s)
                    rows.append(logits[i:i + 1, n - 1])
        for s in sampled_seqs:
            self._publish_blocks(s)
        if sampled_seqs:
            outs = sample_batch(torch.cat(rows), sampled_seqs)
            now = time.monotonic()
            for s, o in zip(sampled_seqs, outs):
                self._append(s, o, now)
        self.steps += 1
        self.last_batch = len(plan.decode) + len(plan.prefill)
        if self.metrics is not None:
            self.metrics.on_step(self)
        return self.last_batch

    def _publish_blocks(self, s: Sequence) -> None:
        n_full = s.num_computed // self.blocks.block_size
        if n_full > s.n_hashed and self.blocks.prefix_caching:
            s.last_hash = self.blocks.register(s.table, s.tokens, s.n_hashed, n_full, s.last_hash)
            s.n_hashed = n_full

    def _append(self, s: Sequence, o: SampleOut, now: float) -> None:
        p = s.params
        s.output.append(o.token)
        if s.guide is not None:
            s.guide.advance(o.token)
        builtin = s.tools is not None and s.tools.builtin
        text, reason, call = "", None, None
        if o.token in p.stop_token_ids or (o.token in self.eos and not p.ignore_eos):
            reason = "stop"
            if isinstance(s.detok, MarkerDetokenizer) and o.token in s.detok.keep:
                text = s.detok.add(o.token)  # e.g. parallel_tool_calls=false stops at </tool_call>
        elif builtin and o.token == self.tool_open and s.call_start < 0:
            s.call_start = len(s.output)  # a call's text is not content: it is not detokenized
        elif builtin and s.call_start >= 0:
            if o.token == self.tool_close:
                call = self.tokenizer.decode(s.output[s.call_start:-1])
                s.call_start = -1
        else:
            text = s.detok.add(o.token)
            if s.detok.stopped is not None:
                reason = "stop"
        if reason is None and (s.n_generated >= p.max_tokens or s.length >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += s.detok.flush()
        d = Delta(s.request_id, s.index, text, [o.token], [o] if p.logprobs else [], reason,
                  len(s.prompt) + s.n_injected, s.n_generated, s.cached_tokens)
        if self.metrics is not None:
            self.metrics.on_token(s, now)
        s.last_emit = now
        if reason is not None:
            self._finish(s, reason)
        elif call is not None:
            self._start_tool(s, call)
        if s.sink is not None:
            s.sink(d)

    # --- background thread ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="berry-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.tools.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.has_work():
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                self._fail_all(e)
            if self.after_step is not None:
                self.after_step()

    def _fail_all(self, err: Exception) -> None:
        import traceback

        traceback.print_exc()
        for s in list(self.scheduler.running) + list(self.scheduler.waiting):
            s.finished, s.finish_reason = True, "error"
            self.scheduler.free(s)
            if s.sink is not None:
                s.sink(Delta(s.request_id, s.index, "", [], [], "error", len(s.prompt), len(s.output)))
        self.scheduler.waiting.clear()
        self._by_request.clear()

    # --- synchronous helper (tests, benchmarks, offline use) ---
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 tools: ToolOptions | None = None, guide=None) -> list[Delta]:
        """Run prompts to completion in this thread; one merged Delta (text, tokens, logprobs) per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Delta] = {}

        def sink(d: Delta) -> None:
            r = results.setdefault(d.request_id, Delta(d.request_id, d.index))
            r.text += d.text
            r.tokens += d.tokens
            r.logprobs += d.logprobs
            r.tool_events += d.tool_events
            r.prompt_tokens, r.completion_tokens = d.prompt_tokens, d.completion_tokens
            r.finish_reason = d.finish_reason if d.finish_reason is not None else r.finish_reason

        rids = [self.add_request(p, q, 1, sink, tools=tools, guide=guide) for p, q in zip(prompts, plist)]
        self.run_until_done()
        return [results[r] for r in rids]

    def run_until_done(self) -> None:
        """Step in this thread until no sequence is left, waiting for tool results when only those remain."""
        while self.has_work() or self._tools_pending:
            if not self.has_work():
                with self._wake:
                    self._wake.wait_for(lambda: self._tool_results, timeout=1.0)
                continue
            self.step()
