"""Export for Ollama: the GGUF plus a Modelfile whose TEMPLATE (Go text/template) renders our chat format,
tool definitions and tool calls included (model/chat_template.jinja is the reference it mirrors, byte for byte).

Ollama's only template function is `json` (Go's json.Marshal: compact, `{"expression":"12*7"}`), but the models were
trained on Python's json.dumps spacing (`{"expression": "12*7"}`), so the TEMPLATE writes JSON itself: "py" renders
a value the way json.dumps(ensure_ascii=False) does (objects by key, arrays, strings with printf "%q", which equals
JSON for printable text; numbers, booleans and null through `json`), and "tool" writes a tool definition field by
field in the OpenAI order (type, function: name, description, parameters: type, properties, required). What Go
cannot reproduce: map keys come in sorted order (Python keeps the client's), a string holding control characters
other than \n \t \r \b \f gets Go escapes, and a tool keeps only the fields Ollama's API type has. A value that is
not a Go map (newer Ollama keeps arguments in an ordered map) falls back to `json`: valid, compact.
tests/test_export_ollama.py renders this TEMPLATE with Go's text/template and compares it with the Jinja template.
"""

from __future__ import annotations

from pathlib import Path

from berrylm.export.gguf_writer import export_gguf, gguf_file_name
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.toolcall import tool_turn
from berrylm.model.transformer import Transformer

_IS_MAP = '(and (ge (len (printf "%v" .)) 4) (eq (slice (printf "%v" .) 0 4) "map["))'
_OBJECT = ('{ {{- $first := true }}{{ range $k, $v := . }}{{ if not $first }}, {{ end }}{{ printf "%q" $k }}: '
           '{{ template "py" $v }}{{ $first = false }}{{ end }}}')
# json.dumps of any value; "props" the same for a tool's properties (Ollama's ToolProperty: type, description, enum)
_DEFINES = (
    '{{- define "py" }}{{ if eq (printf "%T" .) "string" }}{{ printf "%q" . }}'
    '{{ else if ' + _IS_MAP + ' }}' + _OBJECT +
    '{{ else if and (ge (len (printf "%T" .)) 2) (eq (slice (printf "%T" .) 0 2) "[]") }}'
    '[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ template "py" $v }}{{ end }}]'
    '{{ else }}{{ json . }}{{ end }}{{ end }}'
    '{{- define "props" }}{{ if ' + _IS_MAP + ' }}{ {{- $first := true }}{{ range $k, $p := . }}'
    '{{ if not $first }}, {{ end }}{{ printf "%q" $k }}: {"type": {{ template "py" $p.Type }}'
    '{{ if $p.Description }}, "description": {{ printf "%q" $p.Description }}{{ end }}'
    '{{ if $p.Enum }}, "enum": {{ template "py" $p.Enum }}{{ end }}}{{ $first = false }}{{ end }}}'
    '{{ else }}{{ json . }}{{ end }}{{ end }}'
    '{{- define "tool" }}{"type": {{ printf "%q" .Type }}, "function": {"name": {{ printf "%q" .Function.Name }}'
    '{{ if .Function.Description }}, "description": {{ printf "%q" .Function.Description }}{{ end }}, '
    '"parameters": {"type": {{ printf "%q" .Function.Parameters.Type }}, "properties": '
    '{{ template "props" .Function.Parameters.Properties }}{{ if .Function.Parameters.Required }}, '
    '"required": {{ template "py" .Function.Parameters.Required }}{{ end }}}}}{{ end }}'
)
_TOOLS = ('# Tools\nTo call a function, reply with <tool_call>{"name": <name>, "arguments": <json>}</tool_call>\n'
          '<tools>{{- range $.Tools }}\n{{ template "tool" . }}{{- end }}\n</tools>')
# .Messages: Role, Content, ToolCalls (Function.Name, Function.Arguments); .Tools: Ollama's tool definitions.
TEMPLATE = (
    _DEFINES +
    '{{- if .Tools }}{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n' +
    _TOOLS + '<|im_end|>\n{{ end }}{{- end }}'
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "system" }}<|im_start|>system\n{{ $m.Content }}'
    '{{- if and (eq $i 0) $.Tools }}\n\n' + _TOOLS + '{{- end }}'
    '<|im_end|>\n'
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n{{ $m.Content }}'
    '{{- range $m.ToolCalls }}<tool_call>{"name": "{{ .Function.Name }}", "arguments": '
    '{{ template "py" .Function.Arguments }}}</tool_call>{{- end }}<|im_end|>\n'
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
