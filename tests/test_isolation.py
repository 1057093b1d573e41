"""One request can never fail another's: request validation (strict types, documented ranges, bounded lists), and
per-sequence fault isolation in the engine (a fault injected into one sequence of a running batch fails that
sequence alone; the others finish with the output they have without it)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from berrylm.model.checkpoint import load_checkpoint
from berrylm.model.toolcall import parse_call_body
from berrylm.serve.backend import TorchBackend
from berrylm.serve.engine import Engine, EngineConfig
from berrylm.serve.json_guide import JsonGuide
from berrylm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from berrylm.serve.sampler import SamplingParams, sample_batch, sibling_seed
from berrylm.serve.scheduler import Sequence

MSG = [{"role": "user", "content": "hi"}]
TEXTS = ["the quick brown fox", "a", "hello world, this is a somewhat longer prompt", "one two three four"]


def _chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **kw})


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "10"), ("max_tokens", True), ("n", "2"), ("n", 2.0), ("temperature", "1"), ("stream", "true"),
    ("stream", 1), ("logprobs", 1), ("top_logprobs", True), ("seed", "1"), ("seed", 1.5), ("top_k", "5"),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("top_k", 2**63), ("top_k", -2), ("temperature", 2.5), ("top_p", 0),
    ("presence_penalty", 3), ("n", 17), ("top_logprobs", 21), ("logit_bias", {"1": 101}),
    ("logit_bias", {str(i): 1 for i in range(301)}), ("stop", ["a"] * 5), ("stop", "x" * 1025),
    ("messages", MSG * 4097), ("tools", [{}] * 129), ("user", 5), ("model", 1),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": 5}]),
])
def test_request_refused(field, value):
    with pytest.raises(ValidationError):
        _chat(**{field: value})


@pytest.mark.parametrize("key", ["²", "--1", "-1", "1.0", " 1", "1e3", "٣", "x", "", "12345678901"])
def test_logit_bias_keys_are_decimal_token_ids(key):
    with pytest.raises(ValidationError):
        _chat(logit_bias={key: 1})


def test_accepted_values_and_their_sampling():
    r = _chat(temperature=1, top_k=2**63 - 1, seed=2**63 - 1, n=2, max_tokens=3, logit_bias={"7": 5},
              messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}], stop="x")
    assert r.messages[0].text() == "ab" and r.stop == ["x"]
    p = r.sampling(vocab_size=100, max_tokens=3, logprobs=False, top_logprobs=0)
    assert p.top_k == 0 and p.seed == 2**63 - 1 and p.logit_bias == {7: 5.0}  # top_k >= vocab: no filter
    assert _chat(top_k=-1).sampling(100, 3, False, 0).top_k == 0
    with pytest.raises(APIError):
        _chat(logit_bias={"100": 1}).sampling(100, 3, False, 0)
    assert CompletionRequest.model_validate({"prompt": [1, 2], "seed": -(2**63)}).seed == -(2**63)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": [1, True]})


def test_sibling_seed_stays_int64():
    assert sibling_seed(2**63 - 1, 1) == -(2**63)
    assert sibling_seed(5, 2) == 7
    assert all(-(2**63) <= sibling_seed(2**63 - 1, i) < 2**63 for i in range(16))


def test_deeply_nested_tool_call_is_an_error_not_an_exception():
    for body in ['{"name": "calculator", "arguments": ' + "[" * 5000 + "]" * 5000 + "}",
                 "[" * 100_000, '{"name": "x", "arguments": "' + "[" * 5000 + '"}']:
        call = parse_call_body(body)
        assert call.error


# ------------------------------------------------------------------------------------------- the engine

def _backend(path) -> TorchBackend:
    model, tok = load_checkpoint(path)
    return TorchBackend(model, tok)


class FaultyBackend(TorchBackend):
    """Our model, failing any prefill whose tokens include POISON (a fault tied to one sequence's prompt)."""
    POISON = 6  # </tool_response>: plain text never encodes to it

    def __init__(self, inner: TorchBackend):
        self.__dict__.update(inner.__dict__)

    def forward(self, tokens, cache):
        if tokens.shape[1] > 1 and (tokens == self.POISON).any():
            raise RuntimeError("injected forward fault")
        return super().forward(tokens, cache)


class FaultyGuide:
    """Allows everything; its advance raises at the k-th token (a fault in one sequence's per-token handling)."""

    def __init__(self, k: int):
        self.k, self.n = k, 0

    def allows(self, token: int) -> bool:
        return True

    def allowed_mask(self, vocab: int, device=None) -> torch.Tensor:
        return torch.ones(vocab, dtype=torch.bool, device=device)

    def advance(self, token: int) -> None:
        self.n += 1
        if self.n == self.k:
            raise RuntimeError("injected guide fault")


def _run(eng: Engine, requests: list[dict]) -> dict[str, dict]:
    """requests: add_request kwargs plus "name"; -> name -> {"tokens", "reason", "deltas"} after the engine ran dry."""
    out = {}
    for r in requests:
        rec = out[r["name"]] = {"tokens": [], "reason": None, "deltas": 0}
        limit = r.get("sink_fails_at")

        def sink(d, rec=rec, limit=limit):
            rec["deltas"] += 1
            rec["tokens"] += d.tokens
            rec["reason"] = d.finish_reason or rec["reason"]
            if limit is not None and rec["deltas"] == limit:
                raise RuntimeError("injected sink fault")

        eng.add_request(r["prompt"], r["params"], 1, sink, guide=r.get("guide"))
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
        assert steps < 2000
    return out


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_fault_in_one_sequence_fails_it_alone(arch, llama_checkpoint, hybrid_checkpoint):
    be = FaultyBackend(_backend(llama_checkpoint if arch == "llama" else hybrid_checkpoint))
    tok = be.tokenizer
    good = [{"name": f"ok{i}", "prompt": tok.encode(t),
             "params": SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=20, ignore_eos=True)}
            for i, t in enumerate(TEXTS)]
    assert all(FaultyBackend.POISON not in r["prompt"] for r in good)
    cfg = EngineConfig(max_batch=16, block_size=4, num_blocks=256)
    ref = _run(Engine(be, cfg), good)
    bad = [
        # sampling: a seed no int64 tensor holds (the API refuses it; here it stands for any per-row sampling fault)
        {"name": "seed", "prompt": tok.encode("x y z"), "params": SamplingParams(seed=2**64, max_tokens=20)},
        # per-token handling: the guide raises at the 3rd token
        {"name": "guide", "prompt": tok.encode("p q"), "guide": FaultyGuide(3),
         "params": SamplingParams(temperature=0.7, seed=3, max_tokens=20, ignore_eos=True)},
        # the sink (the client's delivery) raises at its 4th delta
        {"name": "sink", "prompt": tok.encode("r s"), "sink_fails_at": 4,
         "params": SamplingParams(temperature=0.7, seed=4, max_tokens=20, ignore_eos=True)},
    ]
    # the forward: its prompt makes the model fail (batched with the others' prefill on llama; alone on a hybrid)
    bad.append({"name": "forward", "prompt": tok.encode("hello") + [FaultyBackend.POISON] + tok.encode("b"),
                "params": SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)})
    eng = Engine(be, cfg)
    got = _run(eng, bad[:2] + good + bad[2:])
    for r in good:
        assert got[r["name"]]["reason"] == "length"
        assert got[r["name"]]["tokens"] == ref[r["name"]]["tokens"], r["name"]
    for r in bad:
        assert got[r["name"]]["reason"] == "error", r["name"]
    assert len(got["guide"]["tokens"]) == 2  # it ran, then failed mid-batch at its 3rd token
    assert eng.num_running() == 0 and eng.num_waiting() == 0 and not eng._by_request
    assert eng.blocks.num_free() == 256  # every block released
    again = _run(eng, good[:1])  # and the engine goes on
    assert again["ok0"]["tokens"] == ref["ok0"]["tokens"]


def test_guided_redraw_is_bounded(llama_checkpoint):
    """json_object with a bias towards tokens JSON never allows: a bounded number of guide checks per step."""
    be = _backend(llama_checkpoint)
    tok = be.tokenizer
    eng = Engine(be)
    guide = JsonGuide(eng.token_bytes, tok.eos_ids)
    calls = 0
    allows = guide.allows

    def counting(t):
        nonlocal calls
        calls += 1
        return allows(t)

    guide.allows = counting
    banned = [i for i in range(tok.vocab_size) if not guide.allows(i)][:300]
    calls = 0
    params = SamplingParams(temperature=2.0, seed=1, max_tokens=8, logit_bias={t: 100.0 for t in banned},
                            json_mode=True)
    s = Sequence("r", 0, tok.encode("{"), params)
    s.guide = guide
    logits = torch.randn(1, tok.vocab_size)
    out = sample_batch(logits, [s])[0]
    assert guide.allows(out.token)
    assert calls < 1100  # 5 draws, then at most the 1024 best candidates: never a scan of the vocabulary per try


def test_logit_bias_vectorised_matches_loop():
    from berrylm.serve.sampler import penalised_logits

    V = 64
    bias = {3: 5.0, 10: -100.0, 63: 1.5}
    s = Sequence("r", 0, [1, 2], SamplingParams(logit_bias=bias))
    logits = torch.zeros(2, V)
    other = Sequence("q", 0, [1], SamplingParams())
    out = penalised_logits(logits, [other, s])
    want = torch.zeros(V)
    for t, b in bias.items():
        want[t] = b
    assert torch.equal(out[1], want) and torch.equal(out[0], torch.zeros(V))
    assert json.dumps(s.params.logit_bias)  # the cache does not change the request's own dict
