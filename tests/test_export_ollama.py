"""The Ollama Modelfile's TEMPLATE rendered by Go's own text/template (a small Go program, built here with Debian's
golang-go, that sets up templates as Ollama does: missingkey=zero, `json` = json.Marshal, Ollama's API types) must
give the very bytes of our Jinja chat template, tool definitions and tool calls included."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from berrylm.model.toolcall import CALCULATOR_TOOL
from tests.conftest import make_checkpoint

RENDER_GO = Path(__file__).parent / "fixtures" / "ollama_render" / "main.go"


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, messages, tools) -> the prompt Ollama's template engine writes."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go; `make install-test` does)")
    d = tmp_path_factory.mktemp("ollama-render")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(d), "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"),
           "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    built = subprocess.run([go, "build", "-o", str(d / "render"), str(RENDER_GO)], cwd=d, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr

    def render(template: str, messages: list[dict], tools: list[dict] | None) -> str:
        (d / "template").write_text(template)
        r = subprocess.run([str(d / "render"), str(d / "template")], input=json.dumps(
            {"messages": messages, "tools": tools or []}), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    return render


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                            "parameters": {"type": "object",
                                                           "properties": {"expression": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}
ODD = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": '1<2 & "x" \\ é 東京\n'}}}
NESTED = {"type": "function", "function": {"name": "lookup", "arguments": {
    "a": 1, "b": [1, 2.5, True, None, "s"], "c": {"d": "e", "f": []}, "g": {}}}}
AS_STRING = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "3*3"}'}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "description": "a city"}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city"]}}}
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi there!"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a berry."},
      {"role": "assistant", "content": "Strawberry."}, {"role": "user", "content": "Another?"}], None),
    ([{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
      {"role": "tool", "content": "84"}, {"role": "assistant", "content": "12*7 = 84."},
      {"role": "user", "content": "thanks"}], TOOLS),
    ([{"role": "system", "content": "You can compute."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, CALL]}, {"role": "tool", "content": "4"}],
     TOOLS),
    ([{"role": "user", "content": "Odd input?"}, {"role": "assistant", "content": None, "tool_calls": [ODD, NESTED]},
      {"role": "tool", "content": "error: syntax error"}, {"role": "tool", "content": "{}"}],
     [CALCULATOR_TOOL, WEATHER]),
    ([{"role": "system", "content": "Be exact."}, {"role": "user", "content": "3*3"},
      {"role": "assistant", "content": "", "tool_calls": [AS_STRING]}, {"role": "tool", "content": "9"},
      {"role": "assistant", "content": "9."}, {"role": "user", "content": "and 12*7?"}], [CALCULATOR_TOOL]),
]


@pytest.mark.parametrize("messages,tools", CONVERSATIONS)
def test_modelfile_template_matches_chat_template(tokenizer, go_render, messages, tools):
    from berrylm.export.ollama import TEMPLATE

    expected = tokenizer.render_chat(messages, tools, add_generation_prompt=True)
    assert go_render(TEMPLATE, messages, tools) == expected


def test_go_json_is_compact(go_render):
    """The renderer's `json` is Go's json.Marshal, as Ollama's is: a template that called it for the arguments would
    write {"expression":"12*7"}, not the {"expression": "12*7"} the models were trained on."""
    got = go_render('{{ range .Messages }}{{ range .ToolCalls }}{{ json .Function.Arguments }}{{ end }}{{ end }}',
                    CONVERSATIONS[2][0], None)
    assert got == '{"expression":"12*7"}'


def test_export_writes_modelfile_and_gguf(tmp_path, tokenizer):
    from berrylm.export.ollama import TEMPLATE, export_ollama
    from berrylm.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(make_checkpoint(tmp_path / "ck", tokenizer, "berry-1.8m"))
    line = export_ollama(model, tok, tmp_path / "ol", "q8_0")
    assert line.endswith(f"ollama create berry-1.8m -f {tmp_path / 'ol'}/Modelfile")
    mf = (tmp_path / "ol" / "Modelfile").read_text()
    gguf_name = mf.splitlines()[0].removeprefix("FROM ./")
    assert (tmp_path / "ol" / gguf_name).stat().st_size > 0
    assert f'TEMPLATE """{TEMPLATE}"""' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf and 'PARAMETER stop "<|endoftext|>"' in mf
