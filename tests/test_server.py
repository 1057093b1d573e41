"""The real server in a subprocess on a free loopback port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.json_oracle import is_json_object, is_json_object_prefix

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: Path, *extra: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "berrylm", "serve", str(ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--threads", "1", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(llama_checkpoint):
    proc, base = _start(llama_checkpoint, "--api-key", KEY, "--max-model-len", "256")
    yield base
    _stop(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _stream_text(client, **kw):
    text, reasons, usage = {}, {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return text, reasons, usage


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server + "/health").status_code == 200  # open without a key


def test_stream_equals_non_stream_and_usage(client, tokenizer):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=20)
    r = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    text, reasons, usage = _stream_text(client, **kw, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
    assert text[0] == r.choices[0].message.content and reasons[0] == r.choices[0].finish_reason == "length"
    assert len(set(text[0])) >= 5, text[0]  # varied text, so the streamed pieces are compared in order
    n_prompt = len(tokenizer.encode_chat(MSG, add_generation_prompt=True))
    assert r.usage.prompt_tokens == usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == usage.completion_tokens == 20
    assert r.usage.total_tokens == n_prompt + 20
    # max_completion_tokens is honoured too
    r2 = client.chat.completions.create(model="tiny", messages=MSG, temperature=0, max_completion_tokens=5,
                                        extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 5 and r.choices[0].message.content.startswith(r2.choices[0].message.content)


def test_completions_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 == r.usage.completion_tokens and "".join(lp.tokens) == r.choices[0].text
    # a dict by token text: two byte tokens of a split UTF-8 character both read "\ufffd" and share one key
    assert all(len(t) == 3 or (len(t) == 2 and "\ufffd" in t) for t in lp.top_logprobs), lp.top_logprobs
    c = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in content)


def test_seeded_sampling_reproducible(client):
    kw = dict(model="tiny", messages=MSG, temperature=1.0, max_tokens=16, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b != c
    n = client.chat.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in n.choices] == [0, 1, 2] and n.choices[0].message.content == a
    assert n.usage.completion_tokens == 48


def test_concurrent_streams_match_solo(server):
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(16)]

    async def run() -> tuple[list[str], list[str]]:
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

        async def one(i: int) -> str:  # seeded sampling: a pure function of the request, whatever the batch
            out = ""
            stream = await ac.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                      temperature=1.0, seed=i, max_tokens=24, stream=True,
                                                      extra_body={"ignore_eos": True})
            async for ch in stream:
                if ch.choices:
                    out += ch.choices[0].delta.content or ""
            return out

        together = await asyncio.gather(*(one(i) for i in range(16)))
        solo = [await one(i) for i in range(16)]
        await ac.close()
        return together, solo

    together, solo = asyncio.run(run())
    assert together == solo
    assert len(set(together)) == 16


def test_stop_string_across_tokens(client):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(set(full)) >= 8, full  # varied text: a stop string can be found in the wrong place
    # a stop string that starts inside one token and ends inside a later one, first seen mid-text
    mid = len(full) // 2
    stop = next(full[i:i + 5] for i in range(mid - 2, len(full) - 5)
                if "\ufffd" not in full[i:i + 5] and full.index(full[i:i + 5]) == i)
    cut = full[:full.index(stop)]
    assert len(cut) >= mid - 2 and len(stop) == 5
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    text, reasons, _ = _stream_text(client, stop=stop, **kw)
    assert text[0] == cut and reasons[0] == "stop"


def test_json_mode(client):
    """Judged by json.loads + jsonschema (tests/json_oracle.py), not by the server's own JSON guide."""
    outs = [client.chat.completions.create(model="tiny", messages=MSG, temperature=1.0, seed=seed, max_tokens=80,
                                           response_format={"type": "json_object"}).choices[0] for seed in range(6)]
    assert any(c.finish_reason == "stop" for c in outs), [c.finish_reason for c in outs]
    for c in outs:
        out = c.message.content
        assert (is_json_object if c.finish_reason == "stop" else is_json_object_prefix)(out), out


def _metric(server, name: str) -> float:
    """A series' value; the server labels its engine series with the model ('model="tiny",' is left out of name)."""
    for line in httpx.get(server + "/metrics").text.splitlines():
        line = line.replace('{model="tiny",', "{").replace('{model="tiny"}', "")
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _running(server) -> float:
    return _metric(server, "berry_running")


def test_disconnect_frees_slot(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "stream": True, "ignore_eos": True}
    aborted = 'berry_sequences_finished_total{reason="abort"}'
    before = _metric(server, aborted)
    with httpx.Client(timeout=10) as h:
        with h.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
            assert _running(server) == 1
    for _ in range(50):
        if _running(server) == 0:
            break
        time.sleep(0.1)
    assert _running(server) == 0
    assert _metric(server, aborted) == before + 1  # freed by the disconnect, not by running to max_tokens


def _err(server, path, body=None, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        r = httpx.post(server + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    elif body is None:
        r = httpx.get(server + path, headers=headers)
    else:
        r = httpx.post(server + path, json=body, headers=headers)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return r.status_code, err


def test_error_paths(server):
    chat = "/v1/chat/completions"
    status, e = _err(server, chat, {"model": "tiny", "messages": MSG, "temperature": 5})
    assert status == 400 and e["param"] == "temperature"
    status, e = _err(server, chat, {"model": "tiny", "messages": MSG, "n": "many"})
    assert status == 400 and e["param"] == "n" and "pydantic" not in e["message"]
    status, e = _err(server, chat, {"model": "tiny"})
    assert status == 400 and e["param"] == "messages"
    status, e = _err(server, chat, raw=b"{not json")
    assert status == 400
    status, e = _err(server, chat, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]})
    assert status == 400 and e["code"] == "context_length_exceeded"
    status, e = _err(server, chat, {"model": "tiny", "messages": MSG, "max_tokens": 10_000})
    assert status == 400 and e["code"] == "context_length_exceeded"
    status, e = _err(server, chat, {"model": "nope", "messages": MSG})
    assert status == 404 and e["code"] == "model_not_found"
    status, e = _err(server, chat, {"model": "tiny", "messages": MSG}, key="wrong")
    assert status == 401
    status, e = _err(server, "/v1/models", key=None)
    assert status == 401
    status, e = _err(server, "/v1/nothing-here")
    assert status == 404
    status, e = _err(server, "/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}})
    assert status == 400 and e["param"] == "logit_bias"
    # unknown fields are ignored
    r = httpx.post(server + chat, json={"model": "tiny", "messages": MSG, "max_tokens": 2, "frobnicate": 1},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_queue_full_503(llama_checkpoint):
    proc, base = _start(llama_checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)

        async def flood():
            ac = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            tasks = [ac.chat.completions.create(model="tiny", messages=MSG, max_tokens=100,
                                                extra_body={"ignore_eos": True}) for _ in range(6)]
            res = await asyncio.gather(*tasks, return_exceptions=True)
            await ac.close()
            return res

        res = asyncio.run(flood())
        busy = [r for r in res if isinstance(r, openai.APIStatusError)]
        assert busy and all(r.status_code == 503 for r in busy)
        assert any(not isinstance(r, Exception) for r in res)
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices  # still serving
    finally:
        _stop(proc)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _engines(pid: int) -> list[int]:
    return [p for p in _children(pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


def test_engine_process_death_is_logged_restarted_and_told(llama_checkpoint):
    """The engine runs in its own process: if it dies, open streams end at once with an error whose code says so,
    the death is logged, the engine process is restarted (/health tells), and the server serves again."""
    proc, base = _start(llama_checkpoint)
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        stream = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        (engine,) = _engines(proc.pid)
        os.kill(engine, 9)
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert "engine process died" in str(e.value) and (e.value.body or {}).get("code") == "engine_died"
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = httpx.get(base + "/health", timeout=10)
            seen.add((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and r.json()["engine_restarts"] == 1, seen
        assert seen <= {(503, "restarting"), (200, "ok")}
        assert _engines(proc.pid) != [engine]
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices  # serving again
    finally:
        _stop(proc)
    log = proc.stdout.read().decode()
    assert "died with exit code -9" in log and "restarted" in log, log


def test_engine_process_keeps_dying_server_exits_nonzero(llama_checkpoint):
    """--engine-restarts 0: the first death gives up; the server shuts down with exit code 3 (for a supervisor)."""
    proc, base = _start(llama_checkpoint, "--engine-restarts", "0")
    try:
        (engine,) = _engines(proc.pid)
        os.kill(engine, 9)
        assert proc.wait(timeout=60) == 3
    finally:
        _stop(proc)
    log = proc.stdout.read().decode()
    assert "giving up" in log and "exiting for a supervisor" in log, log


def test_engine_thread_mode(llama_checkpoint, client):
    """--engine-thread runs the engine inside the HTTP process; same answers as the engine process (`client`'s
    server), greedy and seeded, streamed and not."""
    proc, base = _start(llama_checkpoint, "--engine-thread", "--max-model-len", "256")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        assert _engines(proc.pid) == []  # no engine process: the engine is a thread of this one
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
            kw = dict(model="tiny", messages=MSG, max_tokens=12, extra_body={"ignore_eos": True}, **kw)
            r = c.chat.completions.create(**kw)
            ref = client.chat.completions.create(**kw)
            assert r.usage.completion_tokens == 12 and len(set(r.choices[0].message.content)) > 3
            assert r.choices[0].message.content == ref.choices[0].message.content
            text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                           if ch.choices)
            assert text == ref.choices[0].message.content
    finally:
        _stop(proc)
