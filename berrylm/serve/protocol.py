"""OpenAI request bodies (pydantic) and their translation to engine SamplingParams.

Unknown fields are ignored (pydantic's default). Types are strict, as OpenAI's are: "10" or true is not an
integer, 5 is not a string (an integer is still a number). Every numeric field has the range OpenAI or vLLM
documents, and every list a length bound, so no value can overflow a tensor or cost the engine more than a
bounded amount of work (a 400 otherwise). Responses are built as plain dicts (serve/api.py,
serve/responses.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from berrylm.serve.params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_MESSAGES = 4096  # a conversation longer than this cannot fit any context we serve
MAX_CONTENT_PARTS = 512
MAX_TOOLS = 128  # OpenAI's limit
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 1024  # the detokenizer searches the last len(stop) characters at every token
MAX_LOGIT_BIAS = 300  # OpenAI's limit
_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²".isdigit() is True, int("²") fails


class APIError(Exception):
    """An error the client sees as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class FunctionCall(_Strict):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ContentPart(_Strict):
    """A text content part; this server's models read text only, so other part types are refused."""
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content

    def to_template(self) -> dict:
        role = "system" if self.role == "developer" else self.role
        d: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [{"id": t.id, "type": t.type, "function": t.function.model_dump()}
                               for t in self.tool_calls]
        return d


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict | None = None


MAX_GRAMMAR_CHARS = 65536
GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Common(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None  # vLLM: -1 (or 0) = all tokens
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None  # vLLM: a 64-bit signed integer
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None
    ignore_eos: bool = False
    # structured output (serve/structured.py): vLLM's and llama.cpp's names; at most one per request
    guided_json: dict | bool | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=256)] | None = None
    guided_grammar: GrammarText | None = None
    grammar: GrammarText | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for k in v or {}:
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids written in decimal digits, not {k[:40]!r}")
        return v

    def sampling(self, vocab_size: int, max_tokens: int, logprobs: bool, top_logprobs: int,
                 json_mode: bool = False) -> SamplingParams:
        bias = {}
        for k, b in (self.logit_bias or {}).items():
            if not 0 <= int(k) < vocab_size:
                raise APIError(400, f"logit_bias key '{k}' is not a token id of this model", param="logit_bias")
            bias[int(k)] = b
        t = 1.0 if self.temperature is None else self.temperature
        top_k = self.top_k or 0
        return SamplingParams(
            temperature=t, top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=0 if top_k < 0 or top_k >= vocab_size else top_k, min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, logprobs=logprobs,
            top_logprobs=top_logprobs, max_tokens=max_tokens, stop=list(self.stop or []),
            ignore_eos=self.ignore_eos, json_mode=json_mode)


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(strict=True, extra="allow")  # kept, so unimplemented OpenAI fields can be refused
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # berrylm extension: the first generated tokens are exactly these ids (then sampling as usual); tests use it to
    # make a random-weight model write a tool call
    forced_tokens: list[int] | None = None


MAX_PROMPTS = 256  # prompts in one /v1/completions request (lm-eval batches several)


class CompletionRequest(_Common):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | list[int]
             | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: only score the prompt (echo + logprobs)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None  # accepted by the schema, refused when set (no fill-in-the-middle): serve/prepare.py
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None  # refused unless it equals n

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)
