"""The continuous-batching engine: the inbox and the thread around the scheduler, the model runner and the
per-sequence post-step (nano-vllm's split: sequence / scheduler / block_manager / model_runner, and this shell).

    add_request(prompt ids, params, n, sink)   from any thread; sink(Delta) is called from the engine thread
    abort(request_id)                          from any thread; frees the request's blocks at the next step
    step()                                     drain the inbox -> scheduler.schedule() -> runner.run(plan)
                                               (forwards + one batched sample) -> post-step per sequence -> report
A request asking for its prompt's logprobs (echo) or for max_tokens 0 is scored first, in one forward without the KV
cache (`_score`: the Delta it reports carries `prompt_logprobs`); with max_tokens 0 it ends there.
The HTTP layer (serve/api.py) wraps sink in loop.call_soon_threadsafe onto a per-request asyncio queue.
Built-in tools (serve/tools/builtin.py): a sequence that closes a calculator call is paused, the call runs on a
tool thread, and the result's tokens are appended to the sequence (one prefill) when it comes back.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import replace

import torch

from berrylm.serve.backend import Backend
from berrylm.serve.block_manager import BlockManager
from berrylm.serve.config import ContextLengthExceeded, EngineConfig, QueueFull, context_budget
from berrylm.serve.detokenizer import token_bytes_table
from berrylm.serve.model_runner import ModelRunner
from berrylm.serve.params import SampleOut, SamplingParams, sibling_seed
from berrylm.serve.postprocess import PostStep, StepResult
from berrylm.serve.scheduler import Scheduler
from berrylm.serve.sequence import Delta, Sequence, SequenceStatus, delta_for
from berrylm.serve.tools.builtin import BuiltinTools, ToolEvent, ToolOptions

log = logging.getLogger("berry.engine")

__all__ = ["ContextLengthExceeded", "Delta", "Engine", "EngineConfig", "QueueFull", "context_budget"]


def prompt_logprobs(backend: Backend, prompt: list[int], top: int) -> list[SampleOut | None]:
    """Each prompt token's logprob given the tokens before it (None for the first), with `top` alternatives."""
    tokens = torch.tensor([prompt], device=backend.device)
    lp = backend.forward(tokens, None)[0, :-1].float().log_softmax(-1)  # [T-1, V]: position i predicts token i+1
    nxt = tokens[0, 1:]
    mine = lp.gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
    tops = None
    if top > 0:
        vals, ids = lp.topk(min(top, lp.shape[1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [None] + [SampleOut(t, m, tops[j] if tops is not None else []) for j, (t, m) in
                     enumerate(zip(nxt.tolist(), mine))]


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig | None = None, metrics=None):
        self.backend, self.config, self.metrics = backend, config or EngineConfig(), metrics
        c, cfg = self.config, backend.cfg
        self.tokenizer = backend.tokenizer
        self.runner = ModelRunner(backend, c)
        self.max_model_len, self.kv_note = self.runner.max_model_len, self.runner.kv_note
        # hybrids: no prefix reuse (the linear heads' state at a block boundary is not snapshotted)
        prefix = c.prefix_caching and cfg.n_linear_heads == 0
        self.blocks = BlockManager(self.runner.num_blocks, c.block_size, prefix)
        self.scheduler = Scheduler(self.blocks, c.max_batch, c.prefill_chunk, self.runner.pool.reset_slot)
        self.token_bytes = token_bytes_table(self.tokenizer)
        self.post = PostStep(self.tokenizer, self.max_model_len, self.token_bytes)
        self._inbox: deque = deque()
        self._aborts: deque = deque()
        self._tool_results: deque = deque()  # (sequence, ToolEvent) from the tool thread
        self._tools_pending = 0
        self.tools = BuiltinTools(c.max_tool_rounds, c.tool_timeout_s)
        self._by_request: dict[str, list[Sequence]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._rid = itertools.count()
        self.steps = 0
        self.last_batch = 0
        self.after_step = None  # called on the engine thread after each step (serve/engine_process.py)

    @property
    def pool(self):
        return self.runner.pool

    # --- requests (any thread) ---
    def add_request(self, prompt: list[int], params: SamplingParams, n: int = 1, sink=None,
                    request_id: str | None = None, tools: ToolOptions | None = None, guide=None) -> str:
        """tools: built-in tool use / call markers in the text; guide: a token constraint with JsonGuide's interface
        (allows, allowed_mask, advance) or a callable making one per choice, instead of the json_mode guide."""
        if not prompt:
            raise ValueError("the prompt is empty")
        context_budget(len(prompt), None, self.max_model_len)
        if self.num_waiting() + len(self._inbox) >= self.config.max_waiting:
            raise QueueFull("the server is at capacity; retry later")
        rid = request_id or f"req-{next(self._rid)}"
        seqs = []
        for i in range(n):
            p = params if n == 1 else replace(params, seed=sibling_seed(params.seed, i))
            s = Sequence(rid, i, list(prompt), p, sink, leader=seqs[0] if seqs else None, tools=tools)
            self.post.prepare(s, tools, guide)
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
        return bool(self._inbox or self._aborts or self._tool_results or self.scheduler.has_runnable())

    def tools_pending(self) -> int:
        return self._tools_pending

    # --- the step (engine thread) ---
    def _drain(self) -> None:
        with self._wake:
            inbox, aborts, results = list(self._inbox), list(self._aborts), list(self._tool_results)
            self._inbox.clear()
            self._aborts.clear()
            self._tool_results.clear()
        for seqs in inbox:
            p = seqs[0].params
            if p.prompt_logprobs is not None or p.max_tokens == 0:
                seqs = self._score(seqs)
                if not seqs:
                    continue
            self._by_request[seqs[0].request_id] = seqs
            self.scheduler.add(seqs)
        for rid in aborts:
            for s in self._by_request.pop(rid, []):
                if not s.finished:
                    self._finish(s, "abort")
        for s, ev in results:
            self._tools_pending -= 1
            if not s.finished:
                try:
                    self.scheduler.resume(s)
                    self._report(s, self.post.tool_result(s, ev))
                except Exception as e:  # noqa: BLE001 - this sequence's fault: it alone fails
                    self._fail(s, e)

    @torch.inference_mode()
    def _score(self, seqs: list[Sequence]) -> list[Sequence]:
        """Echo with logprobs and max_tokens 0 (what lm-eval's loglikelihood asks): one forward over the whole prompt
        without the KV cache gives every prompt token's logprob, reported in a first Delta; with max_tokens 0 the
        request ends there ("length"), else its sequences go on to the scheduler. An error fails these alone."""
        s0, p = seqs[0], seqs[0].params
        try:
            lps = None
            if p.prompt_logprobs is not None:
                lps = prompt_logprobs(self.backend, s0.prompt, p.prompt_logprobs)
            for s in seqs:
                reason = "length" if p.max_tokens == 0 else None
                if reason is not None:
                    s.status = SequenceStatus.FINISHED
                    s.finish_reason = reason
                if s.sink is not None:
                    s.sink(delta_for(s, prompt_logprobs=lps, finish_reason=reason))
        except Exception as e:  # noqa: BLE001 - this request's fault: it alone fails
            for s in seqs:
                s.status = SequenceStatus.WAITING
                self._by_request[s.request_id] = seqs
                self._fail(s, e)
            return []
        return [] if p.max_tokens == 0 else seqs

    @torch.inference_mode()
    def step(self) -> int:
        """Run one step; returns the number of sequences that computed something. An error while handling one
        sequence (its sampling parameters, guide, detokenizer, tool call, sink, or a forward that fails for it
        alone: ModelRunner.run) finishes that sequence with "error" and the batch goes on (see `_fail`)."""
        self._drain()
        plan = self.scheduler.schedule()
        seqs, outs = self.runner.run(plan, self._fail)
        now = time.monotonic()
        for s, o in zip(seqs, outs):
            if s.finished:
                continue
            try:
                self.blocks.publish(s)
                r = self.post.token(s, o)
                if self.metrics is not None:
                    self.metrics.on_token(s, now)
                s.last_emit = now
                self._report(s, r)
            except Exception as e:  # noqa: BLE001 - this sequence's fault: it alone fails
                self._fail(s, e)
        self.steps += 1
        self.last_batch = len(plan.decode) + len(plan.prefill)
        if self.metrics is not None:
            self.metrics.on_step(self)
        return self.last_batch

    def _report(self, s: Sequence, r: StepResult) -> None:
        """Act on a post-step result (finish, or pause for a built-in call), then hand its delta to the sink."""
        if r.reason is not None:
            self._finish(s, r.reason)
        elif r.call is not None:
            self._start_tool(s, r.call)
        if s.sink is not None:
            s.sink(r.delta)

    def _fail(self, s: Sequence, err: BaseException) -> None:
        """Finish one sequence with "error" (logged with its request id); the rest of the batch goes on."""
        log.error("request %s choice %d failed: %s: %s", s.request_id, s.index, type(err).__name__, err,
                  exc_info=(type(err), err, err.__traceback__))
        if s.finished:
            return
        self._finish(s, "error")
        if s.sink is not None:
            try:
                s.sink(Delta(s.request_id, s.index, "", [], [], "error", len(s.prompt) + s.n_injected,
                             s.n_generated, s.cached_tokens))
            except Exception:  # noqa: BLE001 - a sink that fails cannot be told
                pass

    def _finish(self, s: Sequence, reason: str) -> None:
        self.scheduler.finish(s, reason)
        sibs = self._by_request.get(s.request_id, [])
        if all(x.finished for x in sibs):
            self._by_request.pop(s.request_id, None)
        if self.metrics is not None:
            self.metrics.on_finish(s)

    def _start_tool(self, s: Sequence, body: str) -> None:
        """Pause s and run the call off this thread; the result comes back through _tool_results."""
        self.scheduler.pause(s)
        self._tools_pending += 1
        rounds, s.tool_rounds = s.tool_rounds, s.tool_rounds + 1

        def done(ev: ToolEvent) -> None:
            with self._wake:
                self._tool_results.append((s, ev))
                self._wake.notify()

        self.tools.run(body, rounds, done)

    # --- background thread ---
    def start(self) -> None:
        if self.backend.device.type == "cuda":
            self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="berry-engine", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """One short sampled request through the whole path before serving (CUDA): the Triton warm-up in ModelRunner
        covers the kernel compiles, this the rest of first use (cuBLAS handles, the caching allocator, the model's
        own strides). Measured on an H200 before it: 4.8 s for the first request, 0.13 s for the second."""
        metrics, self.metrics = self.metrics, None  # not a client's tokens
        try:
            prompt = self.tokenizer.encode("warm up")[:8] or [0]
            self.generate([prompt], SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=3, seed=0))
        finally:
            self.metrics = metrics
            self.steps = 0

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
        """A step failed outside any one sequence's handling (e.g. in the scheduler): every open request ends with
        an error and the engine goes on with the next ones."""
        log.error("engine step failed; failing every open request: %s: %s", type(err).__name__, err,
                  exc_info=(type(err), err, err.__traceback__))
        for s in self.scheduler.finish_all("error"):
            if s.sink is not None:
                try:
                    s.sink(Delta(s.request_id, s.index, "", [], [], "error", len(s.prompt), len(s.output)))
                except Exception:  # noqa: BLE001
                    pass
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
