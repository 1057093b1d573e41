"""Property-based fuzzing of the HTTP API (hypothesis): chat and completions bodies drawn from the request schema and
from mutations of it (wrong types, out-of-range and huge numbers, odd logit_bias keys, odd content parts, deep
nesting, missing fields, truncated or non-JSON bytes). Every answer is a 2xx, or a 4xx in OpenAI's error shape;
never a 5xx and never a reset connection (one keep-alive client sends them all), and /health stays up. A stream
that starts never ends in an error event. CI runs BERRY_FUZZ_EXAMPLES (default 120) examples per endpoint with a
fixed seed (about half of them valid requests that generate)."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.test_server import _start, _stop

EXAMPLES = int(os.environ.get("BERRY_FUZZ_EXAMPLES", "120"))
VOCAB = 512  # the test tokenizer's size

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=20))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=12)
odd_ints = st.sampled_from([0, -1, -2, 17, 10**6, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30])
wild = st.one_of(json_any, odd_ints, st.sampled_from(["10", "true", "²", "--1", "", True, 1e308, -1e308, [], {}]))
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)

# --- valid values, from the schema ---
part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                 "content": st.one_of(text, st.lists(part, min_size=1, max_size=3))})
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["calculator", "get_weather"]),
     "parameters": st.just({"type": "object", "properties": {"x": {"type": "string"}}})})})
sampling = {
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 600), "min_p": st.floats(0, 1), "n": st.integers(1, 3),
    "seed": st.integers(-(2**63), 2**63 - 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=4),
    "stop": st.one_of(text, st.lists(text, max_size=4)), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": text,
    "ignore_eos": st.booleans(), "model": st.just("tiny"),
}
chat_fields = {
    **sampling, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 6),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "tools": st.lists(tool, max_size=2), "parallel_tool_calls": st.booleans(),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function",
                                                               "function": {"name": "calculator"}}]),
    "forced_tokens": st.lists(st.integers(0, VOCAB - 1), max_size=4),
}
completion_fields = {**sampling, "logprobs": st.integers(0, 5), "echo": st.booleans(), "suffix": text}
chat_body = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)},
                                  optional={k: v for k, v in chat_fields.items()})
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(text.filter(bool), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))},
    optional={k: v for k, v in completion_fields.items()})

# --- mutations: one field made wrong, a required field dropped, or bytes that are not the JSON asked for ---
ODD_PARTS = [{"type": "text", "text": 5}, {"type": "text"}, {"type": "image_url", "image_url": {"url": "x"}}, "text"]
ODD_MESSAGES = [[], [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": ODD_PARTS}],
                [{"role": "user", "content": "x"}] * 5000, "hello"]


def _mutations(body: dict, fields: dict) -> st.SearchStrategy[dict]:
    keys = sorted(set(fields) | set(body))
    one = st.tuples(st.sampled_from(keys), wild).map(lambda kv: {**body, kv[0]: kv[1]})
    bias = st.dictionaries(st.sampled_from(["²", "--1", "-1", "1.0", " 1", "1e3", "٣", "", "x", "99999999999",
                                            str(VOCAB)]), st.floats(-100, 100), min_size=1, max_size=2)
    drop = st.sampled_from(sorted(body)).map(lambda k: {x: v for x, v in body.items() if x != k})
    special = [st.builds(lambda b: {**body, "logit_bias": b}, bias), drop]
    if "messages" in body:
        special.append(st.sampled_from(ODD_MESSAGES).map(lambda m: {**body, "messages": m}))
    return st.one_of(one, one, *special)


def _encode(body) -> st.SearchStrategy[bytes]:
    raw = json.dumps(body).encode()
    cut = st.integers(0, max(len(raw) - 1, 0)).map(lambda n: raw[:n])
    return st.one_of(cut, st.just(b"[" * 5000 + b"]" * 5000), st.just(b'{"messages": ' + b"[" * 5000 + b"]" * 5000 +
                                                                      b"}"), st.binary(max_size=40))


def requests(valid: st.SearchStrategy[dict], fields: dict) -> st.SearchStrategy[bytes]:
    """Half valid bodies, ~40% one mutation, ~10% broken bytes."""
    return valid.flatmap(lambda b: st.one_of(*[st.just(json.dumps(b).encode())] * 5,
                                             *[_mutations(b, fields).map(lambda m: json.dumps(m).encode())] * 4,
                                             _encode(b)))


@pytest.fixture(scope="module")
def server(llama_checkpoint):
    proc, base = _start(llama_checkpoint, "--max-model-len", "256")
    with httpx.Client(base_url=base, timeout=120) as client:  # keep-alive: a reset would fail the next example
        yield client
    _stop(proc)


def _check(client: httpx.Client, path: str, raw: bytes) -> None:
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text
        assert "Traceback" not in r.text and "pydantic" not in r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        assert not any('"error"' in e[:12] for e in events), r.text[-300:]
    else:
        assert r.json()["choices"]


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@seed(21)
@SETTINGS
@given(data=st.data())
def test_fuzz_chat_completions(server, data):
    raw = data.draw(requests(chat_body, chat_fields))
    _check(server, "/v1/chat/completions", raw)
    assert server.get("/health").status_code == 200


@seed(22)
@SETTINGS
@given(data=st.data())
def test_fuzz_completions(server, data):
    raw = data.draw(requests(completion_body, completion_fields))
    _check(server, "/v1/completions", raw)
    assert server.get("/health").status_code == 200
