"""OpenAI request bodies (pydantic) and their translation to engine SamplingParams.

Unknown fields are ignored (pydantic's default). Responses are built as plain dicts (serve/api.py, serve/responses.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from berrylm.serve.sampler import SamplingParams


class APIError(Exception):
    """An error the client sees as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type", "text") == "text")
        return self.content

    def to_template(self) -> dict:
        role = "system" if self.role == "developer" else self.role
        d: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [{"id": t.id, "type": t.type, "function": t.function.model_dump()}
                               for t in self.tool_calls]
        return d


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict | None = None


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Common(BaseModel):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def sampling(self, vocab_size: int, max_tokens: int, logprobs: bool, top_logprobs: int,
                 json_mode: bool = False) -> SamplingParams:
        bias = {}
        for k, b in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < vocab_size:
                raise APIError(400, f"logit_bias key '{k}' is not a token id of this model", param="logit_bias")
            bias[int(k)] = b
        t = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            temperature=t, top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, logprobs=logprobs,
            top_logprobs=top_logprobs, max_tokens=max_tokens, stop=list(self.stop or []),
            ignore_eos=self.ignore_eos, json_mode=json_mode)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # berrylm extension: the first generated tokens are exactly these ids (then sampling as usual); tests use it to
    # make a random-weight model write a tool call
    forced_tokens: list[int] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
