"""Tool calling: the engine's built-in calculator round (pause, real sandboxed result, one prefill, continue),
the round cap, batch neighbours unaffected; over HTTP with the official `openai` client: client tools with
tool_choice auto/required/named (valid calls even from random weights), the full round trip, streamed and not,
built-in calls in the response, --no-builtin-tools; and the embedded berry-chat model when it exists."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import openai
import pytest
import torch

from berrylm.model.cache import KVCache
from berrylm.model.checkpoint import load_checkpoint
from berrylm.model.toolcall import CALCULATOR_TOOL, after_call_text, format_tool_call
from berrylm.serve.backend import TorchBackend
from berrylm.serve.engine import Engine, EngineConfig
from berrylm.serve.sampler import SamplingParams
from berrylm.serve.tools.builtin import ToolOptions
from berrylm.serve.tools.openai_tools import ForcedGuide
from tests.conftest import make_checkpoint
from tests.test_server import _start, _stop

ROOT = Path(__file__).resolve().parent.parent
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
QUESTION = [{"role": "user", "content": "What is 1234 * 5678?"}]


def _call_ids(tok, expr: str) -> list[int]:
    return tok.encode(format_tool_call("calculator", {"expression": expr}))


# --- engine level ---
@pytest.fixture(scope="module")
def backend(llama_checkpoint):
    model, tok = load_checkpoint(llama_checkpoint)
    return TorchBackend(model, tok)


def _prompt(tok) -> list[int]:
    return tok.encode_chat(QUESTION, add_generation_prompt=True)


def test_builtin_call_appends_result_and_continues(backend):
    tok = backend.tokenizer
    eng = Engine(backend, EngineConfig(block_size=4, num_blocks=256))
    p, call = _prompt(tok), _call_ids(tok, "1234*5678")
    try:
        out = eng.generate([p], SamplingParams(temperature=0, max_tokens=len(call) + 12, ignore_eos=True),
                           tools=ToolOptions(builtin=True), guide=lambda: ForcedGuide(call))[0]
    finally:
        eng.tools.close()
    assert [e.output for e in out.tool_events] == ["7006652"]
    assert json.loads(out.tool_events[0].arguments) == {"expression": "1234*5678"}
    resp = tok.encode(after_call_text("7006652"))
    # usage: generated tokens only; the tool turn counts as prompt
    assert out.completion_tokens == len(call) + 12 == len(out.tokens)
    assert out.prompt_tokens == len(p) + len(resp)
    assert out.tokens[:len(call)] == call
    # the continuation is greedy decoding over prompt + call + tool turn (the KV cache kept everything)
    full = p + call + resp
    cache = KVCache(backend.cfg, 1, 512)
    with torch.inference_mode():
        logits = backend.model(torch.tensor([full]), cache=cache)[0, -1]
        ref = []
        for _ in range(12):
            ref.append(int(logits.argmax()))
            logits = backend.model(torch.tensor([[ref[-1]]]), cache=cache)[0, -1]
    assert out.tokens[len(call):] == ref


def test_round_cap_refuses_with_an_error_result(backend):
    tok = backend.tokenizer
    eng = Engine(backend, EngineConfig(block_size=4, num_blocks=512, max_tool_rounds=2))
    calls = _call_ids(tok, "2+2") + _call_ids(tok, "3*3") + _call_ids(tok, "1/0")
    try:
        out = eng.generate([_prompt(tok)], SamplingParams(temperature=0, max_tokens=len(calls) + 2, ignore_eos=True),
                           tools=ToolOptions(builtin=True), guide=lambda: ForcedGuide(calls))[0]
    finally:
        eng.tools.close()
    assert [e.output for e in out.tool_events] == ["4", "9", "error: tool call limit reached (2 per request)"]
    assert "calculator" not in out.text and "3*3" not in out.text  # call text is never content


def test_other_sequences_keep_decoding_while_one_waits(backend):
    tok = backend.tokenizer
    eng = Engine(backend, EngineConfig(block_size=4, num_blocks=512))
    p, call = _prompt(tok), _call_ids(tok, "12*7")
    other = tok.encode("the quick brown fox")
    n_b = len(call) + 20
    solo = eng.generate([other], SamplingParams(temperature=0, max_tokens=n_b, ignore_eos=True))[0].tokens
    gate = threading.Event()
    eng.tools.pool.submit(gate.wait)  # occupy the tool thread: the call waits until we open the gate
    got: dict[str, list] = {"a": [], "b": []}
    try:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=len(call) + 4, ignore_eos=True),
                        sink=got["a"].append, request_id="a", tools=ToolOptions(builtin=True),
                        guide=ForcedGuide(call))
        eng.add_request(other, SamplingParams(temperature=0, max_tokens=n_b, ignore_eos=True),
                        sink=got["b"].append, request_id="b")
        while len(got["a"]) < len(call):
            eng.step()
        a = eng.scheduler.running[0]
        assert a.request_id == "a" and a.paused
        before = len(got["b"])
        for _ in range(5):
            eng.step()
        assert len(got["b"]) == before + 5 and a.paused and not any(d.tool_events for d in got["a"])
        gate.set()
        eng.run_until_done()
    finally:
        gate.set()
        eng.tools.close()
    assert [t for d in got["b"] for t in d.tokens] == solo
    assert [e.output for d in got["a"] for e in d.tool_events] == ["84"]
    assert got["a"][-1].completion_tokens == len(call) + 4


# --- over HTTP ---
@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """The tiny fixture tokenizer spends ~450 tokens on two tool schemas: a longer context than 512."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-tools", tokenizer, "berry-1.8m", max_seq_len=2048)


@pytest.fixture(scope="module")
def server(long_checkpoint):
    proc, base = _start(long_checkpoint)
    yield base
    _stop(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def _stream(client, **kw) -> dict:
    """Accumulate a streamed chat completion the way a client would."""
    out = {"content": "", "tool_calls": {}, "builtin": [], "finish": None, "usage": None}
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            out["usage"] = chunk.usage
        for c in chunk.choices:
            out["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                d = out["tool_calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                d["id"] = tc.id or d["id"]
                d["name"] += (tc.function.name or "") if tc.function else ""
                d["arguments"] += (tc.function.arguments or "") if tc.function else ""
            out["builtin"] += (c.delta.model_extra or {}).get("builtin_tool_calls") or []
            out["finish"] = c.finish_reason or out["finish"]
    return out


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_gives_a_valid_call(client, choice):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[CALCULATOR_TOOL, WEATHER],
                                       tool_choice=choice, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (tc,) = c.message.tool_calls
    assert tc.id.startswith("call_") and tc.type == "function"
    assert tc.function.name in ("calculator", "get_weather")
    if isinstance(choice, dict):
        assert tc.function.name == "get_weather"
    assert isinstance(json.loads(tc.function.arguments), dict)
    s = _stream(client, model="tiny", messages=QUESTION, tools=[CALCULATOR_TOOL, WEATHER], tool_choice=choice,
                max_tokens=60, temperature=0)
    assert s["finish"] == "tool_calls"
    assert [(v["name"], v["arguments"]) for v in s["tool_calls"].values()] == \
        [(tc.function.name, tc.function.arguments)]


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_tool_message(client, tokenizer, stream):
    """The call the server returned goes back with its result; the next turn is rendered from both (prompt
    length = our template's) and its answer ends as the model ends it: `stop` at <|im_end|> with the text, or
    `tool_calls` at a further call. The answers are forced (forced_tokens): random weights choose neither."""
    kw = dict(model="tiny", tools=[WEATHER], temperature=0)
    r = client.chat.completions.create(messages=QUESTION, tool_choice="required", max_tokens=80, **kw)
    tc = r.choices[0].message.tool_calls[0]
    history = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                          {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 21 C"}]
    n_prompt = len(tokenizer.encode_chat(history, [WEATHER], add_generation_prompt=True))
    answer = "It is sunny and 21 C in Paris."
    again = format_tool_call("get_weather", {"city": "Lyon"})
    for forced, finish in ((tokenizer.encode(answer) + [tokenizer.im_end_id], "stop"),
                           (tokenizer.encode("Also " + again) + [tokenizer.im_end_id], "tool_calls")):
        args = dict(messages=history, tool_choice="auto", max_tokens=len(forced) + 8, **kw,
                    extra_body={"forced_tokens": forced})
        if stream:
            s = _stream(client, **args)
            content, calls, got, usage = s["content"], [(v["name"], v["arguments"]) for v in
                                                         s["tool_calls"].values()], s["finish"], s["usage"]
        else:
            c = client.chat.completions.create(**args)
            content, got, usage = c.choices[0].message.content, c.choices[0].finish_reason, c.usage
            calls = [(t.function.name, t.function.arguments) for t in c.choices[0].message.tool_calls or []]
        assert got == finish and usage.prompt_tokens == n_prompt
        if finish == "stop":
            assert content == answer and calls == [] and usage.completion_tokens == len(forced)
        else:
            assert content == "Also " and [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Lyon"})]
    if not stream:
        none = client.chat.completions.create(messages=history, tool_choice="none", max_tokens=4, **kw)
        assert none.choices[0].message.tool_calls is None
        assert none.usage.prompt_tokens == len(tokenizer.encode_chat(history, None, add_generation_prompt=True))


def test_bad_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        client.chat.completions.create(model="tiny", messages=QUESTION, tool_choice="required", max_tokens=5)


def test_builtin_calculator_over_http(client, tokenizer):
    call = _call_ids(tokenizer, "1234*5678")
    base = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=1)
    n_resp = len(tokenizer.encode(after_call_text("7006652")))
    kw = dict(model="tiny", messages=QUESTION, max_tokens=len(call) + 6, temperature=0,
              extra_body={"forced_tokens": call, "ignore_eos": True})
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    (b,) = m.model_extra["builtin_tool_calls"]
    assert b["output"] == "7006652" and b["function"]["name"] == "calculator" and b["id"].startswith("call_")
    assert json.loads(b["function"]["arguments"]) == {"expression": "1234*5678"}
    assert m.tool_calls is None and "tool_call" not in (m.content or "")
    assert r.usage.completion_tokens == len(call) + 6
    assert r.usage.prompt_tokens == base.usage.prompt_tokens + n_resp
    s = _stream(client, **kw)
    assert [x["output"] for x in s["builtin"]] == ["7006652"] and s["content"] == m.content
    assert s["usage"].prompt_tokens == r.usage.prompt_tokens


def test_no_builtin_tools_returns_calculator_calls(llama_checkpoint, tokenizer):
    proc, base = _start(llama_checkpoint, "--no-builtin-tools")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        call = _call_ids(tokenizer, "12*7")
        r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=len(call) + 3,
                                           extra_body={"forced_tokens": call + [tokenizer.im_end_id]})
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and "builtin_tool_calls" not in (c.message.model_extra or {})
        assert c.message.tool_calls[0].function.name == "calculator"
        assert json.loads(c.message.tool_calls[0].function.arguments) == {"expression": "12*7"}
    finally:
        _stop(proc)


# --- the embedded chat model ---
BERRY_CHAT = ROOT / "berrylm" / "model" / "embedded" / "berry-chat"


@pytest.fixture(scope="module")
def chat_server():
    if not (BERRY_CHAT / "config.json").exists():
        print("skipping: the embedded model berry-chat is not trained yet (model/embedded/berry-chat)")
        pytest.skip("embedded model berry-chat does not exist yet")
    proc, base = _start(BERRY_CHAT)
    yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    _stop(proc)


@pytest.mark.parametrize("stream", [False, True])
def test_berry_chat_uses_the_calculator(chat_server, stream):
    kw = dict(model="tiny", messages=QUESTION, temperature=0, max_tokens=120)
    if stream:
        s = _stream(chat_server, **kw)
        calls, content = s["builtin"], s["content"]
    else:
        m = chat_server.chat.completions.create(**kw).choices[0].message
        calls, content = m.model_extra.get("builtin_tool_calls") or [], m.content
    assert calls and "1234" in calls[0]["function"]["arguments"] and "5678" in calls[0]["function"]["arguments"]
    assert calls[0]["output"] == "7006652"
    assert "7006652" in content.replace(",", "")


def test_berry_chat_round_trip_with_client_tools(chat_server):
    kw = dict(model="tiny", tools=[CALCULATOR_TOOL], temperature=0, max_tokens=120)
    r = chat_server.chat.completions.create(messages=QUESTION, **kw)
    (tc,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and tc.function.name == "calculator"
    history = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                          {"role": "tool", "tool_call_id": tc.id, "content": "7006652"}]
    r2 = chat_server.chat.completions.create(messages=history, **kw)
    assert "7006652" in r2.choices[0].message.content.replace(",", "")
