"""/tokenize and /detokenize in vLLM's and llama.cpp's shapes, and the prompt's token count in a context-overflow
400, against the real server (the shared two-model fixture)."""

from __future__ import annotations

import httpx
import openai

from berrylm.model.checkpoint import load_tokenizer

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 times 7?"}]


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(base + path, json=body, timeout=60)
    return r.status_code, r.json()


def test_tokenize_text_and_chat_match_what_generation_counts(api_server):
    base = api_server[0]
    tok = load_tokenizer("berry-chat")
    status, out = _post(base, "/tokenize", {"model": "berry-chat", "prompt": "Hello there, 12345!"})
    assert status == 200 and out["tokens"] == tok.encode("Hello there, 12345!")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    status, llama = _post(base, "/tokenize", {"content": "Hello there, 12345!", "with_pieces": True})
    assert [t["id"] for t in llama["tokens"]] == out["tokens"]
    assert "".join(t["piece"] for t in llama["tokens"]) == "Hello there, 12345!"
    # a chat prompt counts exactly what /v1/chat/completions bills as prompt tokens
    status, chat = _post(base, "/tokenize", {"model": "berry-chat", "messages": MSGS})
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    usage = c.chat.completions.create(model="berry-chat", messages=MSGS, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens == len(tok.encode_chat(MSGS, add_generation_prompt=True))
    status, back = _post(base, "/detokenize", {"model": "berry-chat", "tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == back["content"] == "Hello there, 12345!"
    # the other model has its own tokenizer
    status, tiny = _post(base, "/tokenize", {"model": "tiny", "prompt": "Hello there, 12345!"})
    assert status == 200 and tiny["tokens"] != out["tokens"]


def test_tokenize_errors(api_server):
    base = api_server[0]
    status, e = _post(base, "/tokenize", {"prompt": "a", "messages": MSGS})
    assert status == 400 and e["error"]["param"] == "prompt"
    status, e = _post(base, "/detokenize", {"tokens": [10**9]})
    assert status == 400 and e["error"]["param"] == "tokens"
    status, e = _post(base, "/tokenize", {"model": "nope", "prompt": "a"})
    assert status == 404 and "'berry-chat'" in e["error"]["message"] and "'tiny'" in e["error"]["message"]


def test_context_overflow_400_names_the_prompt_token_count(api_server):
    base = api_server[0]
    text = "one two three four five six seven eight nine ten " * 60
    status, count = _post(base, "/tokenize", {"model": "berry-chat", "messages": [{"role": "user", "content": text}]})
    n = count["count"]
    assert n > 512
    status, e = _post(base, "/v1/chat/completions", {"model": "berry-chat", "messages": [
        {"role": "user", "content": text}]})
    assert status == 400 and e["error"]["code"] == "context_length_exceeded"
    assert f"the prompt has {n} tokens" in e["error"]["message"] and "512" in e["error"]["message"]
    short = [{"role": "user", "content": "hi"}]
    status, e = _post(base, "/v1/chat/completions", {"model": "berry-chat", "messages": short, "max_tokens": 600})
    assert status == 400 and e["error"]["param"] == "max_tokens"
    n_short = _post(base, "/tokenize", {"model": "berry-chat", "messages": short})[1]["count"]
    assert f"the prompt ({n_short})" in e["error"]["message"]
