"""Ollama cannot run here: render the Modelfile TEMPLATE with a small Go text/template evaluator (only the
constructs the template uses) and compare with our Jinja chat template, tool calls included."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import make_checkpoint

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _parse(src: str):
    """-> list of nodes: str | ("expr", e) | ("if", [(cond, body)...], else_body) | ("range", vars, e, body)."""
    parts, pos = [], 0
    for m in ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim_next":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("act", m.group(2)))
        if m.group(3):
            parts.append(("trim_next", None))
        pos = m.end()
    tail = src[pos:]
    if parts and parts[-1][0] == "trim_next":
        parts.pop()
        tail = tail.lstrip()
    parts.append(("text", tail))
    nodes, _ = _block(parts, 0)
    return nodes


def _block(parts, i):
    nodes = []
    while i < len(parts):
        kind, val = parts[i]
        if kind == "text":
            nodes.append(val)
            i += 1
            continue
        head = val.split(None, 1)[0]
        if head in ("end", "else"):
            return nodes, i
        if head == "if":
            branches, else_body = [], []
            cond = val[2:].strip()
            while True:
                body, i = _block(parts, i + 1)
                branches.append((cond, body))
                stop = parts[i][1]
                if stop.startswith("else if"):
                    cond = stop[7:].strip()
                elif stop == "else":
                    else_body, i = _block(parts, i + 1)
                    break
                else:
                    break
            nodes.append(("if", branches, else_body))
        elif head == "range":
            spec = val[5:].strip()
            names, expr = ([], spec)
            if ":=" in spec:
                lhs, expr = spec.split(":=")
                names = [v.strip() for v in lhs.split(",")]
            body, i = _block(parts, i + 1)
            nodes.append(("range", names, expr.strip(), body))
        else:
            nodes.append(("expr", val))
        i += 1
    return nodes, i


TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _tokens(expr: str) -> list[str]:
    return TOKEN.findall(expr)


def _truthy(v) -> bool:
    return bool(v)


class Go:
    def __init__(self, root: dict):
        self.vars = {"$": root}

    def value(self, toks, i, dot):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            v = self.call(toks[i + 1:j - 1], dot)
            i = j
            if i < len(toks) and toks[i].startswith("."):
                v, i = self.fields(v, toks[i]), i + 1
            return v, i
        if t.startswith('"'):
            return json.loads(t), i + 1
        if t.isdigit():
            return int(t), i + 1
        if t.startswith("$"):
            name, _, rest = t.partition(".")
            v = self.vars[name]
            return (self.fields(v, "." + rest) if rest else v), i + 1
        if t == ".":
            return dot, i + 1
        if t.startswith("."):
            return self.fields(dot, t), i + 1
        raise ValueError(f"unsupported token {t}")

    @staticmethod
    def fields(v, path):
        for f in path.strip(".").split("."):
            v = v.get(f) if isinstance(v, dict) else None
        return v

    def call(self, toks, dot):
        funcs = {"eq": lambda a, b: a == b, "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
                 "not": lambda a: not _truthy(a), "index": lambda a, k: a[k],
                 "json": lambda a: json.dumps(a, ensure_ascii=False)}
        if toks[0] in funcs:
            args, i = [], 1
            while i < len(toks):
                v, i = self.value(toks, i, dot)
                args.append(v)
            return funcs[toks[0]](*args)
        v, _ = self.value(toks, 0, dot)
        return v

    def run(self, nodes, dot) -> str:
        out = []
        for n in nodes:
            if isinstance(n, str):
                out.append(n)
            elif n[0] == "expr":
                v = self.call(_tokens(n[1]), dot)
                out.append("" if v is None else str(v))
            elif n[0] == "if":
                for cond, body in n[1]:
                    if _truthy(self.call(_tokens(cond), dot)):
                        out.append(self.run(body, dot))
                        break
                else:
                    out.append(self.run(n[2], dot))
            else:
                _, names, expr, body = n
                for k, item in enumerate(self.call(_tokens(expr), dot) or []):
                    if len(names) == 2:
                        self.vars[names[0]], self.vars[names[1]] = k, item
                    elif names:
                        self.vars[names[0]] = item
                    out.append(self.run(body, item))
        return "".join(out)


def go_render(template: str, messages: list[dict], tools: list[dict] | None) -> str:
    def msg(m):
        calls = [{"Function": {"Name": c["function"]["name"], "Arguments": c["function"]["arguments"]}}
                 for c in m.get("tool_calls") or []]
        return {"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls}

    root = {"Messages": [msg(m) for m in messages], "Tools": tools or []}
    return Go(root).run(_parse(template), root)


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                            "parameters": {"type": "object",
                                                           "properties": {"expression": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}
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
]


@pytest.mark.parametrize("messages,tools", CONVERSATIONS)
def test_modelfile_template_matches_chat_template(tokenizer, messages, tools):
    from berrylm.export.ollama import TEMPLATE

    expected = tokenizer.render_chat(messages, tools, add_generation_prompt=True)
    assert go_render(TEMPLATE, messages, tools) == expected


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
