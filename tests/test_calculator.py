"""The built-in calculator: the pure evaluator, its number format, the sandbox, the tool-call text format,
and an adversarial corpus (tests/fixtures/calculator_adversarial.txt) run through the sandbox."""

import asyncio
import io
import json
import os
import re
import sys
import time
import tokenize
from pathlib import Path

import pytest

from berrylm.model.calculator import CalcError, calculate, format_number
from berrylm.model.toolcall import (
    CALCULATOR_TOOL,
    ToolCallParser,
    format_tool_call,
    parse_tool_calls,
    split_content,
)
from berrylm.serve.tools.sandbox import Calculator, ToolResult

FIXTURES = Path(__file__).parent / "fixtures"
CANARY = Path("/tmp/berrylm_calculator_canary")  # corpus lines try to create this file
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]\d\d+)?|True|False")
ALLOWED_NAMES = {"sqrt", "exp", "log", "sin", "cos", "tan", "floor", "ceil", "factorial", "pi", "e", "abs",
                 "round", "min", "max", "math"}
MISBEHAVE = "tests.fixtures.calculator_slow:calculate_or_misbehave"

CASES = [  # (expression, expected string)
    ("12*7", "84"), ("1" * 500, "1" * 500),  # 500 characters: the longest accepted
    ("2**4095", str(2**4095)),  # 4096 bits: the largest integer accepted
    ("1+2*3", "7"), ("(1+2)*3", "9"), ("2**3**2", "512"), ("-2**2", "-4"), ("(-2)**2", "4"),
    ("10/4", "2.5"), ("10/5", "2"), ("1/3", "0.333333333333"), ("2/3", "0.666666666667"), ("7//2", "3"),
    ("-7//2", "-4"), ("7%3", "1"), ("-7%3", "2"), ("7.5%2", "1.5"), ("2**-1", "0.5"), ("2**0.5", "1.41421356237"),
    ("0.1+0.2", "0.3"), ("1e3", "1000"), ("6.0", "6"), ("-0.0", "0"), ("+5", "5"), ("--5", "5"),
    ("10**20", "100000000000000000000"), ("1_000+1", "1001"), ("0x10", "16"), ("1e15", "1e+15"),
    ("1/3*1e-7", "3.33333333333e-08"), ("1.5e-5", "0.000015"), ("1e-6", "0.000001"), ("123456789.123456789",
    "123456789.123"), ("2**0.5*1e20", "1.41421356237e+20"), ("1e300*1e5", "1e+305"),
    ("3 × 4", "12"), ("8 ÷ 2", "4"), ("5 − 7", "-2"),
    ("sqrt(16)", "4"), ("sqrt(2)", "1.41421356237"), ("math.sqrt(2)", "1.41421356237"), ("sqrt(2.25)", "1.5"),
    ("exp(0)", "1"), ("exp(1)", "2.71828182846"), ("log(e)", "1"), ("log(8, 2)", "3"), ("math.log(1000, 10)", "3"),
    ("sin(0)", "0"), ("cos(pi)", "-1"), ("tan(pi/4)", "1"), ("math.sin(math.pi/6)", "0.5"), ("floor(-2.5)", "-3"),
    ("ceil(2.1)", "3"), ("factorial(5)", "120"), ("factorial(20)", "2432902008176640000"), ("pi", "3.14159265359"),
    ("math.e", "2.71828182846"), ("abs(-3.5)", "3.5"), ("round(2.5)", "2"), ("round(3.14159, 2)", "3.14"),
    ("round(1234, -2)", "1200"), ("min(3, 1, 2)", "1"), ("max(1, 2.5)", "2.5"), ("max(2**10, 1000)", "1024"),
    ("1 < 2", "True"), ("2 <= 1", "False"), ("1 < 2 < 3", "True"), ("1 < 3 < 2", "False"), ("2*3 == 6", "True"),
    ("1 != 1", "False"), ("(1+2)*(3+4)/7 - 2**2", "-1"), ("100*1.07**10", "196.715135729"),
]

ERRORS = [  # (expression, message fragment)
    ("1/0", "division by zero"), ("1//0", "division by zero"), ("5%0", "division by zero"), ("0**-1", "division"),
    ("9**9**9", "number too large"), ("2**5000", "number too large"), ("10**2000*10**2000", "number too large"),
    ("1e308*10", "number too large"), ("exp(1000)", "number too large"), ("factorial(1001)", "too large"),
    ("factorial(-1)", "non-negative"), ("factorial(2.5)", "non-negative"), ("sqrt(-1)", "domain"), ("log(0)", "domain"),
    ("(-8)**(1/3)", "negative"), ("round(1.5, 99)", "round"), ("2^3", "**"), ("1+", "syntax error"),
    ("", "empty"), ("x", "name: x"), ("x+1", "name: x"), ("__import__('os')", "unsupported"), ("'a'", "str"),
    ("open('f')", "unsupported function: open"), ("().__class__", "attribute"), ("sqrt(x=4)", "keyword"),
    ("min(5)", "argument"), ("True+1", "bool"), ("(1<2)+1", "True/False"),
    ("1 & 2", "operator"), ("1" * 501, "too long"),
    ("1\x00+1", "syntax error"), ("1 # c", "comment"), ("１+１", "character"),
    ("[1][0]", "unsupported"), ("lambda: 1", "unsupported"),
    # only the module `math` may qualify a name: any other `NAME.attr` is refused, called or not
    ("os.sqrt(16)", "attribute"), ("np.max(1, 2)", "attribute"), ("x.pi", "attribute"), ("sys.e*2", "attribute"),
    ("math.math.pi", "attribute"), ("math.sqrt.sqrt(4)", "attribute"),
    ("sqrt(1, 2)", "sqrt takes 1 argument(s)"), ("round(1, 2, 3)", "round takes 1 to 2 argument(s)"),
]


@pytest.mark.parametrize("expr,want", CASES)
def test_calculate(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr,fragment", ERRORS)
def test_calculate_errors(expr, fragment):
    with pytest.raises(CalcError) as err:
        calculate(expr)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg and len(msg) < 80


def test_format_number():
    table = {6.0: "6", 2.5: "2.5", 1 / 3: "0.333333333333", 2 ** 0.5: "1.41421356237", 1.5e-7: "1.5e-07",
             1e15: "1e+15", 999999999999999.9: "1e+15", 123456789012340.5: "123456789012000", 1e-5: "0.00001",
             -2.5e-300: "-2.5e-300", 1e300: "1e+300", 12.5e14: "1.25e+15", -1234.5: "-1234.5", 0.0: "0",
             10 ** 30: "1000000000000000000000000000000", -7: "-7", True: "True"}
    for x, want in table.items():
        assert format_number(x) == want, x


@pytest.mark.timeout(60)  # a hang guard, not a timing assertion: computed, 10**10**10 alone runs for hours
def test_bounds_refuse_before_computing(monkeypatch):
    import berrylm.model.calculator as calc

    factorials = []  # factorial(10**6) is refused by its bound before math.factorial is called
    real_factorial = calc.math.factorial
    monkeypatch.setattr(calc.math, "factorial", lambda x: factorials.append(x) or real_factorial(x))
    for expr in ["9**9**9", "10**10**10", "99999**99999", "factorial(10**6)", "2**2**2**2**2**2",
                 "(10**100)**(10**100)", "2**4095*2**4095"]:
        with pytest.raises(CalcError, match="too large"):
            calculate(expr)
    assert factorials == []
    assert len(calculate("2**4000")) == 1205  # big but inside the 4096-bit limit


# ------------------------------------------------------------------------------------------------ sandbox

def test_sandbox_evaluate_and_call():
    with Calculator(workers=1, timeout_s=5.0) as calc:
        assert calc.evaluate("12*7") == ToolResult(True, "84")
        assert calc.evaluate("1/0") == ToolResult(False, "error: division by zero")
        assert calc.evaluate("x" * 10_000).content.startswith("error: expression too long")
        assert calc.call("calculator", json.dumps({"expression": "2**10"})) == ToolResult(True, "1024")
        assert calc.call("weather", "{}") == ToolResult(False, "error: unknown tool weather")
        assert not calc.call("calculator", "not json").ok
        assert not calc.call("calculator", '{"expression": 5}').ok
    assert calc.evaluate("1+1") == ToolResult(False, "error: calculator is closed")


def test_sandbox_async_concurrent():
    async def main(calc):
        exprs = [f"{i}*{i}" for i in range(20)]
        results = await asyncio.gather(*(calc.aevaluate(x) for x in exprs))
        assert [r.content for r in results] == [str(i * i) for i in range(20)]
        assert (await calc.acall("calculator", '{"expression": "3-5"}')).content == "-2"

    with Calculator(workers=2, timeout_s=5.0) as calc:
        asyncio.run(main(calc))
        assert len(calc._all) == 2


def test_sandbox_timeout_kills_and_replaces_worker():
    with Calculator(workers=1, timeout_s=0.5, target=MISBEHAVE) as calc:
        assert calc.evaluate("1+1").content == "2"
        (old,) = calc._all
        assert calc.evaluate("spin") == ToolResult(False, "error: timeout")  # "spin" never ends by itself
        assert old.proc.poll() is not None  # the spinning worker is gone
        assert calc.evaluate("2+2").content == "4"  # a fresh worker answers
        assert old not in calc._all and len(calc._all) == 1


def test_sandbox_memory_and_cpu_limits():
    with Calculator(workers=1, timeout_s=10.0, cpu_s=1, memory_mb=256, target=MISBEHAVE) as calc:
        assert calc.evaluate("1+1").ok
        (w,) = calc._all
        if os.path.exists(f"/proc/{w.proc.pid}/limits"):  # the worker really runs under its limits
            limits = Path(f"/proc/{w.proc.pid}/limits").read_text()
            assert re.search(r"Max address space\s+268435456\s+268435456", limits)
            assert re.search(r"Max file size\s+0\s+0", limits)
            assert re.search(r"Max open files\s+8\s+8", limits)
            assert re.search(r"Max cpu time\s+\d\s", limits)
        assert calc.evaluate("grow") == ToolResult(False, "error: resource limit exceeded")  # 4 GiB refused
        assert calc.evaluate("3*3").content == "9"
        # SIGXCPU at 1 s of CPU, not the 10 s timeout (that would answer "error: timeout")
        assert calc.evaluate("cpu") == ToolResult(False, "error: resource limit exceeded")
        assert calc.evaluate("4*4").content == "16"


# ------------------------------------------------------------------------------------------- adversarial

def _names(line: str) -> set[str] | None:
    """NAME tokens of a line (tokenize only reads text), or None when it does not tokenize."""
    try:
        return {t.string for t in tokenize.generate_tokens(io.StringIO(line).readline) if t.type == tokenize.NAME}
    except (tokenize.TokenError, SyntaxError):
        return None


def test_adversarial_corpus(capsys):
    lines = (FIXTURES / "calculator_adversarial.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) >= 200
    CANARY.unlink(missing_ok=True)
    with Calculator(workers=1, timeout_s=1.0) as calc:
        assert calc.evaluate("1+1").ok  # warm: the worker start is not part of any answer's time
        modules = set(sys.modules)
        escapes, slowest, slowest_line, n_ok = [], 0.0, "", 0
        for line in lines:
            t = time.perf_counter()
            r = calc.evaluate(line)
            dt = time.perf_counter() - t
            if dt > slowest:
                slowest, slowest_line = dt, line
            assert r.content != "error: timeout" and r.content != "error: resource limit exceeded", line[:80]
            if r.ok:
                n_ok += 1
                names = _names(line)
                if not NUMBER.fullmatch(r.content) or names is None or not names <= ALLOWED_NAMES:
                    escapes.append((line[:80], r.content[:80]))
            else:
                assert r.content.startswith("error: ") and "\n" not in r.content and len(r.content) < 100, line
            assert "root:" not in r.content and "Traceback" not in r.content
        assert calc._all and all(w.proc.poll() is None for w in calc._all)  # the worker survived everything
    assert not CANARY.exists(), "a corpus line ran a command"
    assert set(sys.modules) == modules, "the parent imported something"
    with capsys.disabled():
        print(f"\ncalculator adversarial corpus: {len(lines)} inputs, {n_ok} plain numbers, escapes {len(escapes)}, "
              f"slowest {slowest * 1000:.1f} ms ({slowest_line[:30]!r})")
    assert escapes == []  # (slowness shows as "error: timeout" above: the sandbox's 1 s bound)


# ------------------------------------------------------------------------------------------- tool calls

def test_tool_schema_and_format():
    fn = CALCULATOR_TOOL["function"]
    assert CALCULATOR_TOOL["type"] == "function" and fn["name"] == "calculator"
    assert fn["parameters"]["required"] == ["expression"]
    assert fn["parameters"]["properties"]["expression"]["type"] == "string"
    assert format_tool_call("calculator", {"expression": "12*7"}) == \
        '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'


def test_parse_tool_calls():
    text = "Let me compute. " + format_tool_call("calculator", {"expression": "12*7"}) + \
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>' + \
        "<tool_call>{not json}</tool_call><tool_call>{\"arguments\": {}}</tool_call><tool_call>{\"name\": \"x\""
    content, calls = split_content(text)
    assert content == "Let me compute. "
    assert len(calls) == 4  # the last one is unterminated: not a call yet
    assert (calls[0].name, calls[0].arguments_json, calls[0].error) == ("calculator", '{"expression": "12*7"}', None)
    assert calls[0].arguments == {"expression": "12*7"}
    assert calls[1].arguments == {"expression": "1+1"}  # arguments given as a JSON string are accepted
    assert calls[2].error and "JSON" in calls[2].error
    assert calls[3].error and "name" in calls[3].error
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
def test_streaming_parser(chunk):
    text = "The answer: <b>" + format_tool_call("calculator", {"expression": "3*(4+5)"}) + " done <tool"
    parser, visible, calls = ToolCallParser(), "", []
    for i in range(0, len(text), chunk):
        v, c = parser.feed(text[i:i + chunk])
        assert "<tool_call" not in v and "expression" not in v  # never leak call text as content
        visible += v
        calls += c
    v, c = parser.finish()
    visible += v
    assert visible == "The answer: <b> done <tool"
    assert [(x.name, x.arguments) for x in calls] == [("calculator", {"expression": "3*(4+5)"})] and c == []

    parser = ToolCallParser()
    assert parser.feed("hi <tool_call>{\"name\": ") == ("hi ", [])
    v, c = parser.finish()
    assert v == "" and len(c) == 1 and c[0].error and "unterminated" in c[0].error
