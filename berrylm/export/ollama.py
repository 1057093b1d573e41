"""Export for Ollama: the GGUF plus a Modelfile whose TEMPLATE (Go text/template) renders our chat format,
tool definitions and tool calls included (model/chat_template.jinja is the reference it mirrors)."""

from __future__ import annotations

from pathlib import Path

from berrylm.export.gguf_writer import export_gguf, gguf_file_name
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.toolcall import tool_turn
from berrylm.model.transformer import Transformer

# .Messages: Role, Content, ToolCalls (Function.Name, Function.Arguments); .Tools; `json` is Ollama's helper.
TEMPLATE = (
    '{{- if .Tools }}{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
    '# Tools\nTo call a function, reply with <tool_call>{"name": <name>, "arguments": <json>}</tool_call>\n<tools>'
    '{{- range .Tools }}\n{{ json . }}{{- end }}\n</tools><|im_end|>\n{{ end }}{{- end }}'
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "system" }}<|im_start|>system\n{{ $m.Content }}'
    '{{- if and (eq $i 0) $.Tools }}\n\n# Tools\nTo call a function, reply with <tool_call>{"name": <name>, '
    '"arguments": <json>}</tool_call>\n<tools>{{- range $.Tools }}\n{{ json . }}{{- end }}\n</tools>{{- end }}'
    '<|im_end|>\n'
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n{{ $m.Content }}'
    '{{- range $m.ToolCalls }}<tool_call>{"name": "{{ .Function.Name }}", "arguments": '
    '{{ json .Function.Arguments }}}</tool_call>{{- end }}<|im_end|>\n'
    '{{ else if eq $m.Role "tool" }}' + tool_turn("{{ $m.Content }}") +
    '{{ else }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n'
    '{{ end }}{{- end }}<|im_start|>assistant\n'
)


def modelfile(gguf_name: str, gen: dict | None = None) -> str:
    gen = gen or {}
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{TEMPLATE}"""',
             'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"',
             f"PARAMETER temperature {gen.get('temperature', 0.7)}", f"PARAMETER top_p {gen.get('top_p', 0.9)}",
             f"PARAMETER num_predict {gen.get('max_new_tokens', 256)}"]
    return "\n".join(lines) + "\n"


def export_ollama(model: Transformer, tok: Tokenizer, out: str | Path, dtype: str = "q8_0",
                  gen: dict | None = None) -> str:
    out = Path(out)
    name = gguf_file_name(model.cfg, dtype)
    export_gguf(model, tok, out / name, dtype)
    (out / "Modelfile").write_text(modelfile(name, gen))
    tag = model.cfg.name.lower().replace("_", "-")
    return f"wrote {out}/Modelfile + {name}; now run: ollama create {tag} -f {out}/Modelfile"
