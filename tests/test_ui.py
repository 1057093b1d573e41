"""The Streamlit app (ui/app.py) under Streamlit's AppTest, against a real `berry serve` of a tiny fixture
checkpoint on loopback (started with --api-key), plus the shared client (ui/client.py) it streams through."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from berrylm.ui.client import ChatClient, ChatError, Reply, ToolCall
from berrylm.ui.server import LocalServer, free_port
from tests.conftest import make_checkpoint

APP = str(Path(__file__).resolve().parent.parent / "berrylm" / "ui" / "app.py")
KEY = "sk-test-ui"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    # a context that holds two turns of the app's default 256-token answers (a random model never stops early)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ui") / "tiny-chat", tokenizer, max_seq_len=2048)
    with LocalServer(str(ckpt), extra_args=["--api-key", KEY]) as srv:
        yield srv


def make_app(monkeypatch, url: str, key: str = KEY) -> AppTest:
    monkeypatch.setenv("BERRY_UI_URL", url)
    monkeypatch.setenv("BERRY_UI_API_KEY", key)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def answers(at: AppTest) -> list:
    return [m for m in at.chat_message if m.name == "assistant"]


def test_client_streams_tokens(server):
    client = ChatClient(server.base_url, KEY)
    assert client.models() == ["tiny-chat"]
    reply, events = Reply(), []
    for ev in client.stream([{"role": "user", "content": "hello"}], reply, temperature=0.0, max_tokens=24,
                            extra_body={"ignore_eos": True}):
        events.append(ev)
    text_events = [e for e in events if e.kind == "text"]
    assert len(text_events) > 1, "the answer came in one piece, not streamed"
    assert reply.text == "".join(e.text for e in text_events) and reply.text
    assert reply.tokens == 24 and reply.finish_reason == "length"
    assert reply.ttft_s is not None and reply.tok_per_s and reply.tok_per_s > 0
    assert "TTFT" in reply.stats() and "tok/s" in reply.stats() and "token limit" in reply.stats()


def test_tool_call_deltas_assemble_in_order():
    """Stream pieces in the server's shapes (serve/tools/builtin.py: text, a built-in call with its output, more
    text; and a client tool call whose arguments come split across deltas) become one ordered Reply, which goes
    back to the server as assistant(tool_calls) + tool + assistant messages."""
    from openai.types.chat.chat_completion_chunk import ChoiceDelta

    fn = {"name": "calculator", "arguments": '{"expression": "12*7"}'}
    pieces = [
        {"role": "assistant", "content": "Let me see. "},
        {"builtin_tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": fn, "output": "84"}]},
        {"content": "It is "},
        {"content": "84."},
    ]
    reply, by_index, kinds = Reply(), {}, []
    for p in pieces:
        kinds += [e.kind for e in ChatClient._events(ChoiceDelta.model_validate(p), reply, by_index)]
    assert kinds == ["text", "tool_call", "tool_result", "text", "text"]
    [call] = reply.tool_calls
    assert (call.id, call.name, call.args_text(), call.result) == ("call_1", "calculator", "12*7", "84")
    assert reply.parts[0] == "Let me see. " and reply.parts[2] == "It is 84." and reply.text == "Let me see. It is 84."
    assert reply.to_messages() == [
        {"role": "assistant", "content": "Let me see. ", "tool_calls": [{"id": "call_1", "type": "function",
                                                                         "function": fn}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
        {"role": "assistant", "content": "It is 84."}]
    # a call left to the client (--no-builtin-tools): arguments in pieces, no result
    reply, by_index = Reply(), {}
    for p in [{"tool_calls": [{"index": 0, "id": "call_2", "type": "function",
                               "function": {"name": "calculator", "arguments": '{"expression": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"2+2"}'}}]}]:
        list(ChatClient._events(ChoiceDelta.model_validate(p), reply, by_index))
    [call] = reply.tool_calls
    assert (call.id, call.args_text(), call.result) == ("call_2", "2+2", None)


def test_chat_streams_and_keeps_the_conversation(server, monkeypatch):
    at = make_app(monkeypatch, server.base_url)
    assert at.sidebar.selectbox(key="model").value == "tiny-chat"
    at.sidebar.number_input(key="seed").set_value(1)
    at.sidebar.text_area(key="system").set_value("You are terse.")
    send(at, "hello berry")
    [a] = answers(at)
    assert a.markdown[0].value.strip(), "empty answer"
    assert "TTFT" in a.caption[0].value and "tok/s" in a.caption[0].value
    assert not at.error
    first = a.markdown[0].value
    send(at, "and again")
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    assert at.chat_message[0].markdown[0].value == "hello berry"
    assert answers(at)[0].markdown[0].value == first  # the earlier answer is still shown, unchanged
    from berrylm.ui.app import messages_for

    msgs = messages_for(at.session_state.history, "You are terse.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    # the second answer is what the server gives for the whole conversation (same seed)
    replay = Reply()
    list(ChatClient(server.base_url, KEY).stream(msgs[:-1], replay, temperature=0.7, top_p=1.0, seed=1,
                                                  max_tokens=256))
    assert replay.text == at.session_state.history[-1]["reply"].text


def test_regenerate_with_seed_and_clear(server, monkeypatch):
    at = make_app(monkeypatch, server.base_url)
    at.sidebar.number_input(key="seed").set_value(7)
    at.sidebar.number_input(key="max_tokens").set_value(32)
    send(at, "tell me something")
    first = at.session_state.history[-1]["reply"].text
    at.sidebar.button(key="regenerate").click().run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.session_state.history[-1]["reply"].text == first  # same seed, same sample
    at.sidebar.number_input(key="seed").set_value(8)
    at.sidebar.button(key="regenerate").click().run()
    assert at.session_state.history[-1]["reply"].text != first
    at.sidebar.button(key="clear").click().run()
    assert not at.chat_message and at.session_state.history == []


def test_tool_call_shown_inline_and_sent_back(server, monkeypatch):
    """A calculator round in the conversation shows as an expander (call + result) and goes back to the
    server as assistant tool_calls + a tool message, which the server accepts and renders."""
    at = make_app(monkeypatch, server.base_url)
    call = ToolCall(id="call_0", name="calculator", arguments='{"expression": "12*7"}', result="84")
    at.session_state.history = [{"role": "user", "content": "What is 12*7?"},
                                {"role": "assistant", "reply": Reply(parts=["Let me compute. ", call, "It is 84."])}]
    at.run()
    [a] = answers(at)
    exp = [e for e in a.expander if "calculator" in e.label]
    assert exp and "12*7" in exp[0].label and "84" in exp[0].label
    texts = [m.value.strip() for m in a.markdown]
    assert texts[0] == "Let me compute." and "It is 84." in texts
    assert [c.value for c in exp[0].code] == ['{"expression": "12*7"}', "84"]
    send(at, "thanks")
    assert not at.error, [e.value for e in at.error]
    assert len(answers(at)) == 2 and answers(at)[1].markdown[0].value
    from berrylm.ui.app import messages_for

    roles = [m["role"] for m in messages_for(at.session_state.history, "")]
    # the untrained test model may itself call the calculator in its reply: tool rounds after "user" are its own
    assert roles[:5] == ["user", "assistant", "tool", "assistant", "user"]
    assert roles[5:] and roles[-1] == "assistant" and set(roles[5:]) <= {"assistant", "tool"}


def test_wrong_key_is_a_clear_message(server, monkeypatch):
    at = make_app(monkeypatch, server.base_url, key="sk-wrong")
    assert any("API key" in w.value for w in at.sidebar.warning)
    send(at, "hello")
    assert any("rejected the API key" in e.value for e in at.error)
    assert not at.exception


def test_server_down_is_a_clear_message(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/v1"
    at = make_app(monkeypatch, url)
    assert any("Cannot reach the server" in w.value for w in at.sidebar.warning)
    send(at, "hello")
    [err] = at.error
    assert "Cannot reach the server" in err.value and url in err.value
    assert not at.exception
    with pytest.raises(ChatError, match="Cannot reach"):
        list(ChatClient(url).stream([{"role": "user", "content": "x"}], Reply()))


def test_context_full_is_a_clear_message(server, monkeypatch):
    at = make_app(monkeypatch, server.base_url)
    send(at, "word " * 2000)  # far past the fixture model's 512-token context
    assert any("no longer fits the model's context" in e.value for e in at.error)
    assert not at.exception
    # the failed turn is not sent again: the next question works
    send(at, "short question")
    assert answers(at)[-1].markdown[0].value and not answers(at)[-1].error


def train_calculator_parrot(path: Path, tokenizer, steps: int = 160) -> Path:
    """A tiny llama that has memorized one calculator conversation (question -> call -> result -> answer),
    rendered with and without a system prompt, so a real server + calculator round trip can be driven by a real
    model after about a second of CPU training."""
    import torch
    import torch.nn.functional as F

    from berrylm.model.checkpoint import save_checkpoint
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    call = {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}
    convo = [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": "84"}, {"role": "assistant", "content": "12*7 is 84."}]
    # no tool list: with built-in tools the server renders the prompt without one (serve/api.py)
    seqs = [tokenizer.encode_chat(([{"role": "system", "content": s}] if s else []) + convo)
            for s in (None, "You are terse.")]
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
    cfg = get_preset("berry-1.8m", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, ffn_dim=128, head_dim=16,
                     n_heads=4, n_kv_heads=2, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    keep = mask[:, 1:].flatten()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy shared CPU, 2 threads of tiny matmuls ran 5-20x slower than 1
    try:
        for _ in range(steps):
            logits = model(x[:, :-1])  # [B, T-1, V]
            loss = F.cross_entropy(logits.flatten(0, 1)[keep], x[:, 1:].flatten()[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(path, model, tokenizer)


@pytest.fixture(scope="session")
def parrot(tmp_path_factory, tokenizer) -> Path:
    """The calculator parrot, trained once per test session (shared with the chat and browser tests)."""
    return train_calculator_parrot(tmp_path_factory.mktemp("parrot") / "parrot", tokenizer)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("builtin", [True, False], ids=["builtin", "no-builtin-tools"])
def test_calculator_round_live(parrot, monkeypatch, builtin):
    """A real model calls the calculator. With the server's built-in tool the page shows the call, its result
    and the answer; with `--no-builtin-tools` it shows the call the server handed back, marked as not run."""
    with LocalServer(str(parrot), extra_args=[] if builtin else ["--no-builtin-tools"]) as srv:
        at = make_app(monkeypatch, srv.base_url, key="")
        at.sidebar.slider(key="temperature").set_value(0.0)
        send(at, "What is 12*7?")
        assert not at.error, [e.value for e in at.error]
        [a] = answers(at)
        reply = at.session_state.history[-1]["reply"]
        [call] = reply.tool_calls
        assert call.name == "calculator" and call.args_text() == "12*7"
        [exp] = [e for e in a.expander if "calculator" in e.label]
        assert "12*7" in exp.label
        if builtin:
            assert call.result == "84" and "84" in exp.label and "84" in reply.text
        else:
            assert call.result is None and "not run" in exp.label and reply.finish_reason == "tool_calls"
        # the answer opened with tokens the stream does not show (the call): tok/s must still span the
        # generation from when the server accepted the request, not from the first event the page could show
        # (an order of timestamps, not a timing bound)
        assert reply.gen_tokens == reply.tokens and reply.gen_s - (reply.total_s - reply.ttft_s) > 1e-9
        assert "tok/s" in a.caption[0].value
