"""`berry serve A B`: each model under its name with its own engine process, the KV budget split and printed,
`model` picks one, an unknown name is a 404 listing the names, /health reports each, /metrics are labelled by
model, and the Streamlit UI's model picker offers both (the shared two-model fixture: berry-chat and tiny)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
from streamlit.testing.v1 import AppTest

from berrylm.model.checkpoint import load_tokenizer

APP = str(Path(__file__).resolve().parent.parent / "berrylm" / "ui" / "app.py")


def test_models_listed_and_picked(api_server):
    base, log, _ = api_server
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    listed = c.models.list().data
    assert [m.id for m in listed] == ["berry-chat", "tiny"] and all(m.model_extra["max_model_len"] == 512
                                                                    for m in listed)
    msgs = [{"role": "user", "content": "hi"}]
    a = c.chat.completions.create(model="berry-chat", messages=msgs, temperature=0, max_tokens=12)
    b = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12,
                                  extra_body={"ignore_eos": True})
    assert a.model == "berry-chat" and b.model == "tiny"
    assert a.choices[0].message.content != b.choices[0].message.content
    # each model's own tokenizer and template count its prompt
    assert a.usage.prompt_tokens == len(load_tokenizer("berry-chat").encode_chat(msgs, add_generation_prompt=True))
    default = c.chat.completions.create(model="", messages=msgs, temperature=0, max_tokens=12)
    assert default.model == "berry-chat" and default.choices[0].message.content == a.choices[0].message.content
    r = httpx.post(base + "/v1/chat/completions", json={"model": "nope", "messages": msgs}, timeout=30)
    e = r.json()["error"]
    assert r.status_code == 404 and e["code"] == "model_not_found" and "'berry-chat', 'tiny'" in e["message"]
    text = "".join(log)
    assert "2 models, KV cache budget 512 MB split 256 MB each" in text
    assert "berry-chat (llama" in text and "tiny (llama" in text


def test_health_and_metrics_per_model(api_server):
    base, _, _ = api_server
    h = httpx.get(base + "/health", timeout=30).json()
    assert h["status"] == "ok" and set(h["models"]) == {"berry-chat", "tiny"}
    assert all(m["status"] == "ok" for m in h["models"].values())
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    c.completions.create(model="tiny", prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
    metrics = httpx.get(base + "/metrics", timeout=30).text
    assert 'berry_model_info{model="berry-chat"} 1.0' in metrics and 'berry_model_info{model="tiny"} 1.0' in metrics
    tiny = re.search(r'^berry_generation_tokens_total\{model="tiny"\} (\S+)', metrics, re.M)
    assert tiny and float(tiny.group(1)) >= 3
    assert re.search(r'^berry_queue_depth\{model="berry-chat"\} ', metrics, re.M)


def test_one_engine_process_per_model(api_server):
    pid = api_server[2]
    children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    engines = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(engines) == 2


def test_ui_model_picker_lists_every_model(api_server, monkeypatch):
    monkeypatch.setenv("BERRY_UI_URL", api_server[0] + "/v1")
    monkeypatch.setenv("BERRY_UI_API_KEY", "none")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    picker = at.selectbox(key="model")
    assert list(picker.options) == ["berry-chat", "tiny"]
    picker.set_value("tiny").run()
    at.chat_input[0].set_value("hello").run()
    assert not at.exception
    assert "tiny" in " ".join(c.value for c in at.caption)
