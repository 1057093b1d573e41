"""The models one server serves, by the name clients pass as `model`.

    registry = ModelRegistry([ServedModel("berry-chat", engine_a), ServedModel("tiny", engine_b)])
    m = registry.get(body.model)     # None -> the first model; an unknown name -> 404 listing the names
    m.engine, m.tok, m.token_bytes, m.max_model_len, m.check_chars(...), m.budget(...)

Each model has its own engine (and engine process). A name maps to a `Route`: the model, plus what a request under
that name changes (today nothing; a LoRA adapter served under its own name would add itself here), so a new kind
of name is one more entry in `routes`, not a change to the endpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from berrylm.serve.config import ContextLengthExceeded, context_budget
from berrylm.serve.protocol import APIError


@dataclass
class ServedModel:
    name: str
    engine: object  # serve.engine.Engine or serve.engine_process.RemoteEngine
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.tok = self.engine.tokenizer
        self.token_bytes = self.engine.token_bytes
        # a text of more characters than this has more tokens than the context holds (a token is at most `longest`
        # bytes, and a character at least one): refused before tokenizing
        longest = max((len(b) for b in self.token_bytes if b), default=1)
        self.max_chars_per_token = max(longest, 1)

    @property
    def scores_prompts(self) -> bool:
        """Whether the engine can score a prompt in one forward without the KV cache (echo + logprobs): the torch
        backend can, an ONNX export (explicit cache tensors) cannot."""
        spec = getattr(self.engine, "spec", None)
        if spec is not None:
            return spec.backend == "torch"
        return type(getattr(self.engine, "backend", None)).__name__ != "OnnxBackend"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len  # the engine process reports its own once started

    def check_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_model_len * self.max_chars_per_token:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, and the "
                                f"{param} ({n_chars} characters) cannot fit in it", param=param,
                           code="context_length_exceeded")

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """Tokens the request may generate; a 400 naming the prompt's token count when it cannot fit."""
        try:
            return context_budget(len(prompt), max_tokens, self.max_model_len)
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None

    def health(self) -> dict:
        engine = self.engine
        if hasattr(engine, "health"):
            return engine.health()
        return {"status": "ok"} if getattr(engine, "alive", True) else {
            "status": "error", "message": "the engine process is not running"}


@dataclass
class Route:
    """What a model name resolves to."""
    model: ServedModel


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("no model to serve")
        self.models = {m.name: m for m in models}
        if len(self.models) != len(models):
            raise ValueError("two models are served under one name (use --served-model-name)")
        self.routes: dict[str, Route] = {m.name: Route(m) for m in models}
        self.default = models[0]

    def names(self) -> list[str]:
        return list(self.routes)

    def get(self, name: str | None) -> ServedModel:
        return self.route(name).model

    def route(self, name: str | None) -> Route:
        if not name:
            return self.routes[self.default.name]
        r = self.routes.get(name)
        if r is None:
            listed = ", ".join(f"'{n}'" for n in self.names())
            raise APIError(404, f"the model '{name[:200]}' does not exist (this server serves {listed})",
                           "invalid_request_error", param="model", code="model_not_found")
        return r

    def engines(self) -> list:
        return [m.engine for m in self.models.values()]
