"""POST /v1/responses through the official `openai` client: client.responses.create (text, instructions, input
items with function_call / function_call_output, function tools, text.format json_schema via responses.parse,
max_output_tokens -> incomplete) and client.responses.stream (typed events in order, the SDK's own accumulation
ending in the same text), plus the 400s for what a stateless server cannot do."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

CALC = {"type": "function", "name": "calculator", "description": "evaluate arithmetic", "strict": True,
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def test_create_text_and_usage(client):
    r = client.responses.create(model="berry-chat", input="hi", instructions="You are Berry.", temperature=0,
                                max_output_tokens=40)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "berry-chat"
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 40
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the same request as chat gives the same text (a thin layer over the chat path)
    c = client.chat.completions.create(model="berry-chat", temperature=0, max_tokens=40, messages=[
        {"role": "system", "content": "You are Berry."}, {"role": "user", "content": "hi"}])
    assert c.choices[0].message.content == r.output_text


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model="tiny", input="tell me a story", max_output_tokens=5, temperature=1.0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_function_call_round_trip(client):
    r = client.responses.create(model="berry-chat", input="What is 12 times 7?", tools=[CALC],
                                tool_choice="required", temperature=0, max_output_tokens=80)
    (call,) = [o for o in r.output if o.type == "function_call"]
    args = json.loads(call.arguments)
    assert call.name == "calculator" and set(args) == {"expression"} and call.call_id
    follow = client.responses.create(model="berry-chat", tools=[CALC], temperature=0, max_output_tokens=60, input=[
        {"role": "user", "content": "What is 12 times 7?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "84"}])
    assert "84" in follow.output_text


class Answer(BaseModel):
    result: int = Field(ge=0, le=1000)
    words: list[str]


def test_parse_json_schema_text_format(client):
    for seed in range(3):
        r = client.responses.parse(model="berry-chat", input=f"What is {seed + 3} plus 4? Answer as JSON.",
                                   text_format=Answer, temperature=1.0, max_output_tokens=200)
        assert isinstance(r.output_parsed, Answer) and 0 <= r.output_parsed.result <= 1000


def test_stream_typed_events(client):
    kinds, deltas = [], []
    with client.responses.stream(model="berry-chat", input="hi", temperature=0, max_output_tokens=100) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == "response.completed" and len(deltas) > 3
    assert "".join(deltas) == final.output_text
    plain = client.responses.create(model="berry-chat", input="hi", temperature=0, max_output_tokens=100)
    assert plain.output_text == final.output_text and plain.status == "completed"
    # cut by max_output_tokens: the stream ends with response.incomplete (as OpenAI's does)
    with client.responses.stream(model="tiny", input="hi", temperature=1.0, max_output_tokens=4) as stream:
        last = [e for e in stream][-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_stream_function_call_and_parse(client):
    kinds = []
    with client.responses.stream(model="berry-chat", input="What is 3 times 9?", tools=[CALC],
                                 tool_choice="required", temperature=0, max_output_tokens=80) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    (call,) = [o for o in final.output if o.type == "function_call"]
    assert json.loads(call.arguments)["expression"]
    with client.responses.stream(model="berry-chat", input="What is 2 plus 2? Answer as JSON.", text_format=Answer,
                                 temperature=1.0, max_output_tokens=200) as stream:
        for _ in stream:
            pass
        parsed = stream.get_final_response().output_parsed
    assert isinstance(parsed, Answer)


@pytest.mark.parametrize("extra,param", [({"store": True}, "store"), ({"previous_response_id": "resp_x"},
                                         "previous_response_id"), ({"reasoning": {"effort": "low"}}, "reasoning"),
                                         ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                                         ({"input": [{"type": "image", "url": "x"}]}, "input[0].type")])
def test_refused_with_a_400(api_server, extra, param):
    r = httpx.post(api_server[0] + "/v1/responses", json={"model": "berry-chat", "input": "hi", **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
