"""Token utilities in vLLM's and llama.cpp's shapes, for clients that budget their context.

    POST /tokenize    {"prompt": "text"} or {"content": "text"} (llama.cpp)      -> {"tokens": [ids], "count": n,
                      {"messages": [...], "tools"?, "add_generation_prompt"?}      "max_model_len": m}
                      the chat prompt exactly as /v1/chat/completions renders it (template, tools)
                      "return_token_strs": true (vLLM) adds "token_strs"; "with_pieces": true (llama.cpp) makes
                      "tokens" a list of {"id", "piece"}
    POST /detokenize  {"tokens": [ids]}                                          -> {"prompt": text, "content": text}
    GET /tokenizer_info[?model=NAME]   eos/bos tokens, chat template, context (vLLM's; lm-eval's remote tokenizer)
"model" picks the model as everywhere (default: the first). Same key, body limit and time bound as /v1/*.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import Field

from berrylm.serve.guard import read_body
from berrylm.serve.prepare import render_messages
from berrylm.serve.protocol import MAX_MESSAGES, MAX_TOOLS, APIError, ChatMessage, _Strict
from berrylm.serve.server import Server, parse_body


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 20)]


def tokenize(srv: Server, raw: bytes) -> dict:
    body = parse_body(raw, TokenizeRequest)
    model = srv.registry.get(body.model)
    texts = [x for x in (body.prompt, body.content) if x is not None]
    if len(texts) + (body.messages is not None) != 1:
        raise APIError(400, "give exactly one of 'prompt' (or 'content') and 'messages'", param="prompt")
    if body.messages is not None:
        if not body.add_generation_prompt:
            text = model.tok.render_chat([m.to_template() for m in body.messages], tools=body.tools,
                                         add_generation_prompt=False)
            ids = model.tok.encode(text)
        else:
            ids = render_messages(model, [m.to_template() for m in body.messages], body.tools)
    else:
        model.check_chars(len(texts[0]), "prompt")
        ids = model.tok.encode(texts[0])
    out: dict = {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}
    strs = [srv.token_str(model, t)[0] for t in ids] if body.return_token_strs or body.with_pieces else None
    if body.return_token_strs:
        out["token_strs"] = strs
    if body.with_pieces:
        out["tokens"] = [{"id": t, "piece": s} for t, s in zip(ids, strs)]
    return out


def detokenize(srv: Server, raw: bytes) -> dict:
    body = parse_body(raw, DetokenizeRequest)
    model = srv.registry.get(body.model)
    if any(not 0 <= t < model.tok.vocab_size for t in body.tokens):
        raise APIError(400, "tokens contains ids outside the vocabulary", param="tokens")
    text = model.tok.decode(body.tokens)
    return {"prompt": text, "content": text}


def tokenizer_info(srv: Server, model_name: str | None) -> dict:
    """vLLM's GET /tokenizer_info: what a client needs to tokenize as the server does (lm-eval's remote tokenizer)."""
    model = srv.registry.get(model_name)
    tok = model.tok
    return {"tokenizer_class": "berrylm", "eos_token": tok.eos_tokens[0], "bos_token": tok.bos_token,
            "pad_token": None, "chat_template": tok.chat_template, "model_max_length": model.max_model_len}


def register(app: FastAPI, srv: Server) -> None:
    @app.get("/tokenizer_info")
    async def _tokenizer_info(model: str | None = None):
        return tokenizer_info(srv, model)

    @app.post("/tokenize")
    async def _tokenize(request: Request):
        return await srv.bounded.run(tokenize, srv, await read_body(request, srv.max_request_bytes))

    @app.post("/detokenize")
    async def _detokenize(request: Request):
        return await srv.bounded.run(detokenize, srv, await read_body(request, srv.max_request_bytes))
