"""Request bodies -> what the engine runs (on a bounded thread: serve/guard.py): validation beyond the field
types, the chat template, tokenization, the context budget, sampling parameters, tools and structured output.

    p = prepare_chat(srv, raw)         -> Prepared (one prompt)
    p = prepare_completion(srv, raw)   -> Prepared (one or more prompts: OpenAI's list of prompts)
Fields OpenAI defines that this server does not implement are refused with a 400 naming them (never ignored):
completions `suffix` and `best_of` != n; chat `audio`, `prediction`, non-text `modalities`, `store: true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from berrylm.serve.models import ServedModel
from berrylm.serve.params import SamplingParams
from berrylm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from berrylm.serve.server import Server, parse_body
from berrylm.serve.structured import output_grammar, schema_of, tool_grammar
from berrylm.serve.tools.builtin import ToolOptions
from berrylm.serve.tools.openai_tools import ForcedGuide, ToolCallGuide, resolve_tool_choice


@dataclass
class Prepared:
    """A validated request, ready for the engine: one (prompt, params) per prompt."""
    body: ChatCompletionRequest | CompletionRequest
    model: ServedModel
    prompts: list[list[int]]
    params: SamplingParams
    tools: ToolOptions | None = None
    guide: object = None
    parse: bool = False  # chat: parse tool calls out of the text
    echo: list[str] = field(default_factory=list)  # completions: each prompt's text, echoed back

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    def requests(self) -> list[tuple]:
        return [(p, self.params, self.tools, self.guide) for p in self.prompts]


def refuse_unimplemented(extra: dict | None, fields: dict) -> None:
    """A 400 for a field OpenAI defines that this server would otherwise silently ignore. fields: name -> a
    predicate on its value that is True when the value asks for something not implemented."""
    for name, asks in fields.items():
        if extra and name in extra and asks(extra[name]):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


CHAT_UNSUPPORTED = {"audio": lambda v: v is not None, "prediction": lambda v: v is not None,
                    "modalities": lambda v: v is not None and v != ["text"], "store": lambda v: v is True,
                    "web_search_options": lambda v: v is not None}


def render_messages(model: ServedModel, messages: list[dict], tools: list[dict] | None) -> list[int]:
    model.check_chars(sum(len(m["content"] or "") for m in messages), "messages")
    try:
        text = model.tok.render_chat(messages, tools=tools, add_generation_prompt=True)
    except Exception as e:  # template errors (e.g. raise_exception) are the client's input
        raise APIError(400, f"cannot render the messages: {str(e)[:200]}", param="messages") from None
    model.check_chars(len(text), "messages")
    return model.tok.encode(text)


def prepare_chat(srv: Server, raw: bytes, body: ChatCompletionRequest | None = None,
                 schema: dict | None = None, schema_param: str = "response_format.json_schema.schema") -> Prepared:
    """body: already parsed (the Responses API builds one); schema: a json_schema it asks for (text.format)."""
    body = body or parse_body(raw, ChatCompletionRequest)
    refuse_unimplemented(body.model_extra, CHAT_UNSUPPORTED)
    model = srv.registry.get(body.model)
    tok = model.tok
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = [m.to_template() for m in body.messages]
    try:
        mode, names = resolve_tool_choice(body.tool_choice, body.tools)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice" if body.tools else "tools") from None
    rf = body.response_format
    if rf is not None and rf.type == "json_schema":
        schema = schema_of(rf)
    grammar = output_grammar(body, tok, model.token_bytes, schema, schema_param)
    json_mode = rf is not None and rf.type == "json_object" and grammar is None
    structured = json_mode or grammar is not None
    if structured and mode == "forced":
        raise APIError(400, "a forced tool_choice cannot be combined with structured output", param="tool_choice")
    # built-in calculator: only without client tools; else calculator calls are parsed like any tool call
    builtin = srv.builtin_tools and not body.tools and body.tool_choice != "none" and not structured
    parse = mode != "none" or (not body.tools and not builtin and body.tool_choice != "none")
    prompt = render_messages(model, messages, body.tools if mode != "none" else None)
    max_tokens = model.budget(prompt, body.max_completion_tokens or body.max_tokens)
    params = body.sampling(tok.vocab_size, max_tokens, body.logprobs, body.top_logprobs or 0, json_mode)
    guide = grammar
    strict = tool_grammar(body.tools, mode, names, tok, model.token_bytes) if grammar is None else None
    if strict is not None:
        if body.forced_tokens:
            raise APIError(400, "forced_tokens cannot be combined with strict tools", param="forced_tokens")
        guide = strict
    elif mode == "forced":
        if body.forced_tokens:
            raise APIError(400, "forced_tokens cannot be combined with a forced tool_choice", param="forced_tokens")
        guide = partial(ToolCallGuide, model.token_bytes, tok.eos_ids, names, max_tokens,
                        tok.tool_call_id, tok.tool_call_end_id)  # picklable: the engine process
    elif body.forced_tokens:
        if guide is not None:
            raise APIError(400, "forced_tokens cannot be combined with structured output", param="forced_tokens")
        if any(not 0 <= t < tok.vocab_size for t in body.forced_tokens):
            raise APIError(400, "forced_tokens contains ids outside the vocabulary", param="forced_tokens")
        if len(body.forced_tokens) > max_tokens:
            raise APIError(400, "forced_tokens is longer than max_tokens", param="forced_tokens")
        guide = partial(ForcedGuide, body.forced_tokens)
    if parse and body.parallel_tool_calls is False:
        params.stop_token_ids.append(tok.tool_call_end_id)  # one call, then stop
    return Prepared(body, model, [prompt], params, ToolOptions(builtin=builtin, markers=parse), guide, parse)


def prepare_completion(srv: Server, raw: bytes) -> Prepared:
    body = parse_body(raw, CompletionRequest)
    if body.suffix:
        raise APIError(400, "'suffix' is not supported (these models have no fill-in-the-middle format)",
                       param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
    model = srv.registry.get(body.model)
    tok = model.tok
    prompts = []
    for p in body.prompts():
        if isinstance(p, str):
            model.check_chars(len(p), "prompt")
            ids = tok.encode(p)
        else:
            if any(not 0 <= t < tok.vocab_size for t in p):
                raise APIError(400, "prompt contains token ids outside the vocabulary", param="prompt")
            ids = list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompts.append(ids)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: use it with echo (to score the prompt)",
                       param="max_tokens")
    max_tokens = min(model.budget(p, body.max_tokens) for p in prompts)
    grammar = output_grammar(body, tok, model.token_bytes)
    lp = body.logprobs is not None
    params = body.sampling(tok.vocab_size, max_tokens, lp, body.logprobs or 0)
    if body.echo and (lp or body.max_tokens == 0) and not model.scores_prompts:
        raise APIError(400, "echo with logprobs or max_tokens 0 needs --backend torch (an ONNX export cannot score "
                            "a prompt)", param="echo", code="unsupported_parameter")
    if body.echo and lp:
        params.prompt_logprobs = body.logprobs
    params.max_tokens = max_tokens if body.max_tokens != 0 else 0
    echo = [tok.decode(p) for p in prompts] if body.echo else []
    return Prepared(body, model, prompts, params, guide=grammar, echo=echo)
