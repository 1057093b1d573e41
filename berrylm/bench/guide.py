"""Per-token cost of enforcing a JSON schema at 16 streams: llguidance against xgrammar, on our tokenizer.

    python -m berrylm.bench.guide [--model berry-chat] [--streams 16] [--tokens 256] [--engines llguidance,xgrammar]
    (xgrammar is not a berrylm dependency: `pip install xgrammar` to include it)

Both engines see the same vocabulary, built from our token-bytes table, and the same schema (a list of at least
8 nested person objects, so no stream finishes early and the batch stays at 16), with compact separators.
Two measurements per engine:
  mask      the guide's own work per decode step: the 16 masks (each engine's batched call), unpacking them to a
            [16, V] bool, and consuming the 16 sampled tokens, replayed over the token sequences the real model
            wrote under the schema with that engine (the engines differ in details: xgrammar refuses some number
            digits llguidance allows, so one engine's sequences cannot always be replayed through the other)
  engine    `Engine.generate` of the real model, 16 streams x --tokens tokens, temperature 1.0, guided by the
            engine against unguided (ignore_eos): wall time per step, and the difference per token
Also: the time to compile the schema once (per request in the server) and the first mask after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"type": "string", "enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                "required": ["city", "zip"], "additionalProperties": False},
    "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["name", "age", "color", "tags", "address", "score"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 8}},
          "required": ["people"], "additionalProperties": False}


class XGrammarSpec:
    """The bench's xgrammar guide, with GrammarSpec's interface (serve/grammar.py), so the engine runs it the same
    way: `make` builds a GrammarMatcher; `batch_masks` fills all rows with one BatchGrammarMatcher call."""

    def __init__(self, schema: dict):
        self.schema = schema

    def make(self, tokenizer, token_bytes, max_tokens=None):
        return XGrammarGuide(*xgrammar_compiled(tokenizer, token_bytes, self.schema))


_XG: dict = {}


def xgrammar_compiled(tokenizer, token_bytes, schema):
    import xgrammar as xg

    if "compiler" not in _XG:
        info = xg.TokenizerInfo([b if b is not None else b"" for b in token_bytes], xg.VocabType.RAW,
                                vocab_size=len(token_bytes), stop_token_ids=list(tokenizer.eos_ids))
        _XG["info"], _XG["compiler"] = info, xg.GrammarCompiler(info, max_threads=1)
        _XG["batch"] = xg.BatchGrammarMatcher(max_threads="auto")
    key = json.dumps(schema)  # property order matters: both engines keep the schema's order
    if key not in _XG:
        _XG[key] = _XG["compiler"].compile_json_schema(key, any_whitespace=False, separators=(", ", ": "))
    return _XG[key], len(token_bytes)


class XGrammarGuide:
    masks = True
    active = True

    def __init__(self, compiled, vocab: int):
        import xgrammar as xg

        self.matcher, self.vocab = xg.GrammarMatcher(compiled, max_rollback_tokens=1), vocab

    @property
    def complete(self) -> bool:
        return self.matcher.is_terminated() or self.matcher.is_completed()

    def allows(self, token: int) -> bool:
        if self.matcher.accept_token(token):
            self.matcher.rollback(1)
            return True
        return False

    def advance(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise ValueError(f"xgrammar refused token {token}")

    @staticmethod
    def batch_masks(guides, vocab: int) -> torch.Tensor:
        import xgrammar as xg

        from berrylm.serve.grammar import unpack

        bitmask = xg.allocate_token_bitmask(len(guides), guides[0].vocab)
        _XG["batch"].batch_fill_next_token_bitmask([g.matcher for g in guides], bitmask)
        return unpack(bitmask, vocab)


def _load_foreign(path):
    """A GGUF file or HF dir (export's readers: bench sits above export and serve)."""
    from berrylm.export import load_any

    return load_any(path)


def _prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(tok.render_chat([{"role": "user", "content": f"List eight people as JSON ({i})."}],
                                       add_generation_prompt=True)) for i in range(n)]


def _specs(names: list[str]) -> dict:
    from berrylm.serve.grammar import GrammarSpec, json_schema_grammar

    out = {}
    for name in names:
        ours = name == "llguidance"
        out[name] = GrammarSpec(json_schema_grammar(SCHEMA), json=True) if ours else XGrammarSpec(SCHEMA)
    return out


def run_engine(engine, prompts, tokens: int, spec) -> tuple[float, list]:
    from berrylm.serve.sampler import SamplingParams

    params = [SamplingParams(temperature=1.0, max_tokens=tokens, seed=i, ignore_eos=spec is None)
              for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, guide=spec)
    return time.perf_counter() - t0, outs


def mask_replay(spec, engine, seqs: list[list[int]], vocab: int) -> list[float]:
    """Seconds per step of the guide's own work, replaying `seqs` (one per stream) through fresh guides."""
    guides = [spec.make(engine.tokenizer, engine.token_bytes) for _ in seqs]
    cls = type(guides[0])
    times = []
    for step in range(min(len(s) for s in seqs)):
        t0 = time.perf_counter()
        cls.batch_masks(guides, vocab)
        for g, s in zip(guides, seqs):
            g.advance(s[step])  # raises if this engine refuses a token the other one allowed
        times.append(time.perf_counter() - t0)
    return times


def compile_times(name: str, engine, repeats: int = 5) -> tuple[float, float]:
    """(compile the schema, first mask after it) in ms, median of fresh compiles (no cache)."""
    from berrylm.serve.grammar import GrammarSpec, json_schema_grammar

    comp, first = [], []
    for r in range(repeats):
        schema = {**SCHEMA, "title": f"run{r}"}  # a distinct schema each time: no compile cache hit
        t0 = time.perf_counter()
        if name == "llguidance":
            g = GrammarSpec(json_schema_grammar(schema), json=True).make(engine.tokenizer, engine.token_bytes)
        else:
            g = XGrammarSpec(schema).make(engine.tokenizer, engine.token_bytes)
        t1 = time.perf_counter()
        type(g).batch_masks([g], len(engine.token_bytes))
        t2 = time.perf_counter()
        comp.append(t1 - t0)
        first.append(t2 - t1)
    return statistics.median(comp) * 1e3, statistics.median(first) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="berry bench guide", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="berry-chat", help="embedded name, checkpoint, GGUF file or HF dir")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from berrylm.serve.backend import load_backend
    from berrylm.serve.engine import Engine, EngineConfig

    names = args.engines.split(",")
    engine = Engine(load_backend(args.model, "torch", "cpu", "float32", load_foreign=_load_foreign), EngineConfig())
    vocab = engine.backend.cfg.vocab_size
    prompts = _prompts(engine.tokenizer, args.streams)
    specs = _specs(names)
    run_engine(engine, prompts[:2], 8, None)  # warm-up
    t_plain, _ = run_engine(engine, prompts, args.tokens, None)
    t_plain, _ = min((t_plain, None), (run_engine(engine, prompts, args.tokens, None)[0], None))
    per_step_plain = t_plain / args.tokens
    print(f"guide bench: {args.model}, {args.streams} streams x {args.tokens} tokens, temperature 1.0, "
          f"{args.threads} torch thread(s), vocab {vocab}")
    print(f"  unguided engine: {per_step_plain * 1e3:.2f} ms/step "
          f"({args.streams * args.tokens / t_plain:.0f} tok/s)")
    rows = []
    for name in names:
        t, outs = run_engine(engine, prompts, args.tokens, specs[name])
        t = min(t, run_engine(engine, prompts, args.tokens, specs[name])[0])
        lens = [len(o.tokens) for o in outs]
        assert min(lens) == args.tokens, f"{name}: a stream stopped early ({lens})"
        seqs = [o.tokens for o in outs]  # replayed through fresh guides of the same engine
        masks = mask_replay(specs[name], engine, seqs, vocab)
        comp, first = compile_times(name, engine)
        step = t / args.tokens
        rows.append((name, step, (step - per_step_plain) / args.streams, statistics.median(masks),
                     sorted(masks)[int(0.99 * (len(masks) - 1))], comp, first))
    print("\n| engine | engine ms/step | overhead per token | mask+advance per step (p50 / p99) | "
          "compile | first mask |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| none | {per_step_plain * 1e3:.2f} | - | - | - | - |")
    for name, step, per_tok, m50, m99, comp, first in rows:
        print(f"| {name} | {step * 1e3:.2f} | {per_tok * 1e6:+.0f} us | {m50 * 1e3:.3f} / {m99 * 1e3:.3f} ms | "
              f"{comp:.2f} ms | {first:.2f} ms |")
    print(f"\nsample output: {engine.tokenizer.decode(seqs[0])[:160]}...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
