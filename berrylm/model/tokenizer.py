"""Tokenizer: byte-level BPE (the `tokenizers` library, GPT-2 pre-tokenizer split) + the chat template.

The special tokens come first in the vocabulary (ids 0..6), then the 256 byte symbols, then merges.
The chat template (model/chat_template.jinja) is stored with every checkpoint and rendered here with the
same Jinja settings transformers uses, so `apply_chat_template` and our own path give the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END]

DEFAULT_CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


class Tokenizer:
    """Our tokenizers need only `tk`. A FOREIGN vocabulary (an imported GGUF / HF model) names its own
    `special_tokens`, `eos_tokens` (first one = the template's eos_token) and optional `bos_token`; ids of our
    specials that such a vocabulary lacks are None."""

    def __init__(self, tk: HFTokenizer, chat_template: str = DEFAULT_CHAT_TEMPLATE,
                 special_tokens: list[str] | None = None, eos_tokens: list[str] | None = None,
                 bos_token: str | None = None):
        self.tk = tk
        self.chat_template = chat_template
        self._template = compile_template(chat_template)
        names = SPECIAL_TOKENS if special_tokens is None else special_tokens
        self.special_ids = {t: tk.token_to_id(t) for t in names}
        missing = [t for t, i in self.special_ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens: {', '.join(missing)}")
        self.eos_tokens = list(eos_tokens or [IM_END, ENDOFTEXT])
        self.bos_token = bos_token
        self.endoftext_id = tk.token_to_id(ENDOFTEXT)
        self.im_start_id = tk.token_to_id(IM_START)
        self.im_end_id = tk.token_to_id(IM_END)
        self.tool_call_id = tk.token_to_id(TOOL_CALL)
        self.tool_call_end_id = tk.token_to_id(TOOL_CALL_END)

    # --- files ---
    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        tk = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        tpl = directory / "chat_template.jinja"
        return cls(tk, tpl.read_text() if tpl.exists() else DEFAULT_CHAT_TEMPLATE)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(directory / "tokenizer.json"))
        (directory / "chat_template.jinja").write_text(self.chat_template)

    # --- text ---
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @property
    def eos_ids(self) -> list[int]:
        ids = [self.tk.token_to_id(t) for t in self.eos_tokens]
        return [i for i in ids if i is not None]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token strings in the text become their special ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    # --- chat ---
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_tokens[0])

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, tools, add_generation_prompt))
