"""Structured output enforced by the grammar engine, through the official `openai` client against a real server:
chat.completions.parse / .stream with pydantic models (nested objects, enums, arrays, optional fields, bounded
numbers) at temperature 1.0 with the embedded berry-chat (every response parses), strict tool arguments,
vLLM-style guided_regex / guided_choice / guided_grammar and llama.cpp's GBNF `grammar`, and a 400 naming the
schema feature the engine cannot enforce."""

from __future__ import annotations

import json
import re
from enum import Enum

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

N = 8  # requests per mode; each must parse


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str
    zip_code: str | None  # optional: anyOf string / null


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=120)
    score: float = Field(ge=0.0, le=1.0)
    color: Color
    tags: list[str]
    address: Address


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def _check(p: Person) -> None:
    assert isinstance(p, Person) and 0 <= p.age <= 120 and 0.0 <= p.score <= 1.0 and p.color in Color


def test_parse_every_response_at_temperature_one(client):
    for seed in range(N):
        r = client.chat.completions.parse(model="berry-chat", messages=[
            {"role": "user", "content": f"Describe person number {seed} as JSON."}], response_format=Person,
            temperature=1.0, seed=seed, max_tokens=400)
        assert r.choices[0].finish_reason == "stop"
        _check(r.choices[0].message.parsed)


def test_stream_parses_every_response_at_temperature_one(client):
    seen = set()
    for seed in range(N):
        with client.chat.completions.stream(model="berry-chat", messages=[
                {"role": "user", "content": f"Describe person number {seed} as JSON."}], response_format=Person,
                temperature=1.0, seed=100 + seed, max_tokens=400) as stream:
            chunks = sum(1 for e in stream if e.type == "content.delta")
            final = stream.get_final_completion()
        _check(final.choices[0].message.parsed)
        assert chunks > 5  # streamed token by token, not in one piece
        seen.add(final.choices[0].message.content)
    assert len(seen) == N  # sampled, not one fixed answer


class Step(BaseModel):
    op: str = Field(pattern=r"^[+*/-]$")
    value: int = Field(ge=-1000, le=1000)


class Plan(BaseModel):
    steps: list[Step] = Field(min_length=1, max_length=3)
    done: bool


def test_random_weights_follow_the_schema_too(client):
    """The tiny random model writes noise on its own; under the grammar its output still parses (a pattern, array
    bounds, a bool), so the constraint, not the model, makes it valid."""
    for seed in range(4):
        r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "plan"}],
                                          response_format=Plan, temperature=1.0, seed=seed, max_tokens=300)
        if r.choices[0].finish_reason == "stop":
            plan = r.choices[0].message.parsed
            assert 1 <= len(plan.steps) <= 3 and all(s.op in "+-*/" for s in plan.steps)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit", "days"], "additionalProperties": False}}}


CALC = {"type": "function", "function": {
    "name": "calculator", "strict": True,
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "pattern": "^[0-9+*/() -]+$"},
                                                    "precision": {"type": "integer", "minimum": 0, "maximum": 3}},
                   "required": ["expression", "precision"], "additionalProperties": False}}}


def test_strict_tool_arguments_follow_the_schema(client):
    """tool_choice required: the whole call is the grammar, so every answer is a call with valid arguments."""
    for seed in range(6):
        m = client.chat.completions.create(
            model="berry-chat", messages=[{"role": "user", "content": "What is the weather in Paris this week?"}],
            tools=[WEATHER], tool_choice="required", temperature=1.0, seed=seed, max_tokens=200).choices[0].message
        (c,) = m.tool_calls
        args = json.loads(c.function.arguments)
        assert c.function.name == "get_weather" and set(args) == {"city", "unit", "days"}
        assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 7


def test_strict_tool_in_auto_mode_is_enforced_once_the_model_calls(client):
    """tool_choice auto: the model decides to call (berry-chat calls its calculator for arithmetic); from its
    <tool_call> on, the arguments follow the strict schema: a `precision` it never learned to write, and only
    arithmetic characters in the expression."""
    calls = 0
    for seed in range(4):
        m = client.chat.completions.create(
            model="berry-chat", messages=[{"role": "user", "content": f"What is {12 + seed} times 7?"}],
            tools=[CALC], temperature=1.0, seed=seed, max_tokens=120).choices[0].message
        for c in m.tool_calls or []:
            args = json.loads(c.function.arguments)
            assert set(args) == {"expression", "precision"} and 0 <= args["precision"] <= 3
            assert re.fullmatch(r"[0-9+*/() -]+", args["expression"])
            calls += 1
    assert calls >= 2


def test_regex_choice_and_grammars(client):
    base = dict(model="berry-chat", messages=[{"role": "user", "content": "Answer."}], temperature=1.0,
                max_tokens=60)
    for seed in range(3):
        r = client.chat.completions.create(**base, seed=seed, extra_body={"guided_regex": r"[A-Z][a-z]{2,8} [0-9]{3}"})
        assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{3}", r.choices[0].message.content)
        r = client.chat.completions.create(**base, seed=seed, extra_body={"guided_choice": ["yes", "no", "maybe"]})
        assert r.choices[0].message.content in ("yes", "no", "maybe")
        lark = 'start: "(" num " " op " " num ")"\nnum: /[0-9]{1,3}/\nop: "+" | "*"\n'
        r = client.chat.completions.create(**base, seed=seed, extra_body={"guided_grammar": lark})
        assert re.fullmatch(r"\([0-9]{1,3} [+*] [0-9]{1,3}\)", r.choices[0].message.content)
        gbnf = 'root ::= "x=" [0-9] [0-9]? ";"'
        r = client.completions.create(model="tiny", prompt="value:", temperature=1.0, seed=seed, max_tokens=10,
                                      extra_body={"grammar": gbnf})
        assert re.fullmatch(r"x=[0-9][0-9]?;", r.choices[0].text)


def _post(base: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(base + "/v1/chat/completions", json={"model": "berry-chat", "messages": [
        {"role": "user", "content": "hi"}], **body}, timeout=60)
    return r.status_code, r.json()


@pytest.mark.parametrize("schema,named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
def test_unenforceable_schema_is_a_400_naming_it(api_server, schema, named):
    status, body = _post(api_server[0], {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}})
    assert status == 400 and named in body["error"]["message"], body
    assert body["error"]["param"] == "response_format.json_schema.schema"
    bad_tool = {**WEATHER["function"], "parameters": {"type": "object", "properties": {
        "xs": {"type": "array", "contains": {"type": "integer"}}}}}
    status, body = _post(api_server[0], {"tools": [{"type": "function", "function": bad_tool}]})
    assert status == 400 and "contains" in body["error"]["message"] and body["error"]["param"] == "tools"


def test_structured_output_refusals(api_server):
    base = api_server[0]
    status, body = _post(base, {"guided_regex": "a+", "guided_choice": ["a"]})
    assert status == 400 and "at most one" in body["error"]["message"]
    status, body = _post(base, {"guided_regex": "(?=x)"})
    assert status == 400 and body["error"]["param"] == "guided_regex"
    status, body = _post(base, {"guided_regex": "a+", "ignore_eos": True})
    assert status == 400 and body["error"]["param"] == "ignore_eos"
    status, body = _post(base, {"grammar": "root ::= missing_rule"})
    assert status == 400 and body["error"]["param"] == "grammar"
