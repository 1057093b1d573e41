"""A request's structured-output options -> one checked grammar (serve/grammar.py) for the engine, or a 400.

What a request may ask for (at most one of them):
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   (OpenAI; chat)
    text.format {"type": "json_schema", "schema": ...}                                      (/v1/responses)
    guided_json: SCHEMA   guided_regex: "REGEX"   guided_choice: ["a", "b"]                 (vLLM's names)
    guided_grammar: "LARK or GBNF"   grammar: "GBNF"                                        (vLLM's / llama.cpp's)
and, for chat, function tools with "strict": true, whose arguments then follow the tool's `parameters` schema:
with a forced tool_choice the whole call is one grammar; with "auto" the grammar starts when the model opens a call.
`response_format` json_object stays with serve/json_guide.py (any JSON object). A schema keyword or grammar feature
llguidance cannot enforce is a 400 naming it (param says which field), never a silent pass.
"""

from __future__ import annotations

from berrylm.serve.grammar import (
    GrammarError,
    GrammarSpec,
    check,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
    tool_call_grammar,
)
from berrylm.serve.protocol import APIError

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "grammar")


def _checked(grammar_of, arg, param: str, tok, token_bytes, what: str) -> str:
    try:
        g = grammar_of(arg)
        check(g, tok, token_bytes)
    except GrammarError as e:
        raise APIError(400, f"{what} cannot be enforced: {e}", param=param, code="unsupported_schema") from None
    return g


def schema_of(response_format) -> dict | None:
    """The schema of a json_schema response_format (OpenAI nests it as json_schema.schema)."""
    js = response_format.json_schema
    if not isinstance(js, dict):
        raise APIError(400, "response_format json_schema needs a 'json_schema' object with a 'schema'",
                       param="response_format.json_schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict | bool):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format.json_schema.schema")
    return schema


def output_grammar(body, tok, token_bytes, schema: dict | None = None,
                   schema_param: str = "response_format.json_schema.schema") -> GrammarSpec | None:
    """The grammar a request's output must follow, or None. `schema` is an already extracted json_schema (chat's
    response_format or the Responses API's text.format)."""
    asked = [f for f in GUIDED_FIELDS if getattr(body, f, None) is not None]
    if schema is not None:
        asked.insert(0, schema_param)
    if len(asked) > 1:
        raise APIError(400, f"at most one structured-output option per request, not {', '.join(asked)}",
                       param=asked[1])
    if not asked:
        return None
    if body.ignore_eos:
        raise APIError(400, "ignore_eos cannot be combined with structured output (the grammar ends the text)",
                       param="ignore_eos")
    field = asked[0]
    if field == schema_param:
        return GrammarSpec(_checked(json_schema_grammar, schema, field, tok, token_bytes, "the JSON schema"),
                           json=True)
    value = getattr(body, field)
    if field == "guided_json":
        if not isinstance(value, dict | bool):
            raise APIError(400, "guided_json must be a JSON schema object", param=field)
        return GrammarSpec(_checked(json_schema_grammar, value, field, tok, token_bytes, "the JSON schema"),
                           json=True)
    if field == "guided_regex":
        return GrammarSpec(_checked(regex_grammar, value, field, tok, token_bytes, "the regex"))
    if field == "guided_choice":
        if not value:
            raise APIError(400, "guided_choice needs at least one string", param=field)
        return GrammarSpec(_checked(choice_grammar, value, field, tok, token_bytes, "the choice"))
    return GrammarSpec(_checked(lark_grammar, value, field, tok, token_bytes, "the grammar"))


def strict_tools(tools: list[dict] | None) -> dict[str, dict | None]:
    """name -> parameter schema for strict tools, None for the others (any JSON object)."""
    out: dict[str, dict | None] = {}
    for t in tools or []:
        f = t["function"]
        params = f.get("parameters")
        if f.get("strict") is True:
            if params is not None and not isinstance(params, dict):
                raise APIError(400, f"tool '{f['name']}': parameters must be a JSON schema object",
                               param="tools")
            out[f["name"]] = params if params is not None else {"type": "object", "properties": {},
                                                                "additionalProperties": False}
        else:
            out[f["name"]] = None
    return out


def tool_grammar(tools: list[dict] | None, mode: str, names: list[str], tok, token_bytes) -> GrammarSpec | None:
    """The grammar for calls to strict tools: None when no tool is strict (serve/tools/openai_tools.py's
    ToolCallGuide then forces calls with any JSON object as arguments). mode "forced": exactly one call, to one of
    `names`; "auto": every call the model opens follows the named tool's schema."""
    schemas = strict_tools(tools)
    if mode == "none" or not any(v is not None for v in schemas.values()):
        return None
    if mode == "forced":
        schemas = {n: schemas[n] for n in names}
        if all(v is None for v in schemas.values()):
            return None
    opening = tok.tool_call_id if mode == "forced" else None
    try:
        g = tool_call_grammar(schemas, opening, tok.tool_call_end_id)
        check(g, tok, token_bytes)
    except GrammarError as e:
        raise APIError(400, f"a strict tool's parameters cannot be enforced: {e}", param="tools",
                       code="unsupported_schema") from None
    return GrammarSpec(g, trigger=None if mode == "forced" else tok.tool_call_id, json=True)
