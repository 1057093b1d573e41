"""`berry chat`: one-shot and REPL, against a local model (its own `berry serve` subprocess) and a --url server."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from berrylm.ui.chat import TerminalChat
from berrylm.ui.client import ChatClient, Event, Reply, ToolCall
from berrylm.ui.server import LocalServer, free_port
from tests.conftest import make_checkpoint
from tests.test_ui import parrot  # noqa: F401  (the session fixture: a model that calls the calculator)

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-chat"
PARAMS = ["--seed", "3", "--max-tokens", "24", "--temperature", "0.8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat", tokenizer)


@pytest.fixture(scope="module")
def server(ckpt):
    with LocalServer(str(ckpt), extra_args=["--api-key", KEY]) as srv:
        yield srv


def berry(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berrylm", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_one_shot_local_model_matches_the_server(ckpt, server):
    r = berry("chat", str(ckpt), "-p", "hello there", *PARAMS)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # scripts get the answer and nothing else
    reply = Reply()
    list(ChatClient(server.base_url, KEY).stream([{"role": "user", "content": "hello there"}], reply,
                                                 seed=3, max_tokens=24, temperature=0.8))
    assert reply.text and r.stdout == reply.text + "\n"


def test_repl_over_url_commands_and_turns(server):
    script = "hello\n/system Be brief.\nhi\nhow are you\n/reset\n/help\n/quit\nnot reached\n"
    r = berry("chat", "--url", server.base_url, "--api-key", KEY, *PARAMS, stdin=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(system prompt set; conversation cleared)" in out and "(conversation cleared)" in out
    assert "commands: /reset" in out
    assert out.count("(TTFT") == 3 and out.count("tok/s") == 3  # three answers, each with its stats
    assert r.stderr == ""


def test_conversation_state(server):
    out = io.StringIO()
    chat = TerminalChat(ChatClient(server.base_url, KEY), "tiny-chat", dict(seed=1, max_tokens=8), out=out,
                        err=out)
    chat.command("/system You are a calculator.")
    chat.ask("one")
    chat.ask("two")
    msgs = chat.conv.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "You are a calculator." and msgs[3]["content"] == "two"
    chat.command("/reset")
    assert chat.conv.messages() == [{"role": "system", "content": "You are a calculator."}]
    chat.command("/system")
    assert chat.conv.messages() == []
    assert chat.command("/quit") is False


@pytest.mark.timeout(120)
def test_calculator_calls_live(request):
    """One shot: the answer on stdout, the calculator call on stderr; with --no-builtin-tools the call the
    server hands back is shown as not run. The REPL shows the call inline with the answer."""
    model = str(request.getfixturevalue("parrot"))
    with LocalServer(model) as srv:
        r = berry("chat", "--url", srv.base_url, "--temperature", "0", "-p", "What is 12*7?")
        assert r.returncode == 0 and r.stdout == "12*7 is 84.\n" and r.stderr == "[calculator] 12*7 -> 84\n"
        r = berry("chat", "--url", srv.base_url, "--temperature", "0", stdin="What is 12*7?\n")
        assert r.returncode == 0 and "[calculator] 12*7 -> 84\n12*7 is 84.\n(TTFT" in r.stdout
    with LocalServer(model, extra_args=["--no-builtin-tools"]) as srv:
        r = berry("chat", "--url", srv.base_url, "--temperature", "0", "-p", "What is 12*7?")
        assert r.returncode == 0 and r.stdout == "\n"
        assert r.stderr == "[calculator] 12*7 (not run: the server returned the call to the client)\n"


def test_tool_calls_are_shown():
    out = io.StringIO()
    chat = TerminalChat(ChatClient("http://127.0.0.1:1/v1"), None, {}, out=out, err=out)
    call = ToolCall(id="c0", name="calculator", arguments='{"expression": "12*7"}', result="84")
    chat._show(Event("tool_result", tool=call), out)
    assert "[calculator] 12*7 -> 84" in out.getvalue()


@pytest.mark.parametrize("case", ["down", "wrong-key", "bad-model"])
def test_errors_are_one_line(case, server, tmp_path):
    if case == "down":
        r = berry("chat", "--url", f"http://127.0.0.1:{free_port()}/v1", "-p", "hi")
        want = "Cannot reach the server"
    elif case == "wrong-key":
        r = berry("chat", "--url", server.base_url, "--api-key", "sk-wrong", "-p", "hi")
        want = "rejected the API key"
    else:
        r = berry("chat", str(tmp_path / "no-such-model"), "-p", "hi")
        want = "the local server exited"
    assert r.returncode == 1
    assert want in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
