"""The Streamlit chat app (`berry ui`, or `streamlit run berrylm/ui/app.py`). Talks to any OpenAI-compatible server
through ui/client.py; the sidebar holds the connection (base URL, API key, model from /v1/models), the system
prompt and the sampling settings. The conversation lives in st.session_state.history:
    {"role": "user", "content": str}  |  {"role": "assistant", "reply": Reply}
Each answer streams in as it comes; calculator calls show inline as expanders; TTFT and tokens/s sit under
every answer. Failures show as one st.error line, never a traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `streamlit run berrylm/ui/app.py` from anywhere

from berrylm.ui.chat import NOT_RUN  # noqa: E402
from berrylm.ui.client import DEFAULT_URL, ChatClient, ChatError, Reply, ToolCall  # noqa: E402


def init_state() -> None:
    ss = st.session_state
    ss.setdefault("history", [])
    ss.setdefault("base_url", os.environ.get("BERRY_UI_URL", DEFAULT_URL))
    ss.setdefault("api_key", os.environ.get("BERRY_UI_API_KEY") or os.environ.get("OPENAI_API_KEY", ""))


@st.cache_data(ttl=15, show_spinner=False)
def list_models(base_url: str, api_key: str) -> tuple[list[str], str | None]:
    try:
        return ChatClient(base_url, api_key, timeout=5).models(), None
    except ChatError as e:
        return [], str(e)


def sidebar() -> dict:
    with st.sidebar:
        st.header("berrylm chat")
        st.text_input("Base URL", key="base_url", help="any OpenAI-compatible /v1 endpoint")
        st.text_input("API key", key="api_key", type="password", help="leave empty when the server has none")
        models, err = list_models(st.session_state.base_url, st.session_state.api_key)
        if err:
            st.warning(err)
        model = st.selectbox("Model", models or ["(none)"], key="model", disabled=not models)
        system = st.text_area("System prompt", key="system", placeholder="You are a helpful assistant.")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="temperature")
        top_p = st.slider("Top p", 0.05, 1.0, 1.0, 0.05, key="top_p")
        max_tokens = st.number_input("Max tokens", 1, 32768, 256, key="max_tokens")
        seed = st.number_input("Seed", value=None, step=1, key="seed", placeholder="random")
        c1, c2 = st.columns(2)
        regenerate = c1.button("Regenerate", key="regenerate", width="stretch")
        clear = c2.button("Clear", key="clear", width="stretch")
    params = dict(temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                  seed=None if seed is None else int(seed))
    return dict(model=model if models else None, system=system, params=params, regenerate=regenerate, clear=clear)


def messages_for(history: list[dict], system: str) -> list[dict]:
    """OpenAI messages of the conversation; a failed answer and the question it failed on are left out."""
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    for i, turn in enumerate(history):
        if turn["role"] == "user":
            nxt = history[i + 1] if i + 1 < len(history) else None
            if nxt is not None and nxt["reply"].error:
                continue
            msgs.append({"role": "user", "content": turn["content"]})
        elif not turn["reply"].error:
            msgs += turn["reply"].to_messages()
    return msgs


def show_tool(call: ToolCall) -> None:
    head = f"{call.name or 'tool'}: `{call.args_text()}`"
    label = f"{head} (not run: {NOT_RUN})" if call.result is None else f"{head} → `{call.result}`"
    with st.expander(label, icon=":material/calculate:"):
        st.markdown(f"**call** `{call.name}` with arguments")
        st.code(call.arguments or "{}", language="json")
        if call.result is not None:
            st.markdown("**result**")
            st.code(call.result, language=None)


def show_reply(reply: Reply) -> None:
    for part in reply.parts:
        if isinstance(part, str):
            st.markdown(part)
        else:
            show_tool(part)
    if reply.error:
        st.error(reply.error)
    show_footer(reply)


def show_footer(reply: Reply) -> None:
    """Stats (TTFT, tokens/s) and a copy box (st.code has a copy button) under an answer."""
    if reply.stats():
        st.caption(reply.stats())
    if reply.text and not reply.error:
        with st.expander("Copy", icon=":material/content_copy:"):
            st.code(reply.text, language=None)


def stream_answer(settings: dict) -> Reply:
    """Ask the server for the next assistant turn, rendering it as it streams."""
    ss = st.session_state
    reply = Reply()
    client = ChatClient(ss.base_url, ss.api_key)
    messages = messages_for(ss.history, settings["system"])
    with st.chat_message("assistant"):
        box, text, last = st.empty(), "", 0.0

        def flush() -> None:
            if text:
                box.markdown(text)
            else:
                box.empty()

        try:
            for ev in client.stream(messages, reply, model=settings["model"], **settings["params"]):
                if ev.kind == "text":
                    text += ev.text
                    if time.perf_counter() - last > 0.03:  # redraw at most ~30 times a second
                        box.markdown(text + "▌")
                        last = time.perf_counter()
                elif ev.kind == "tool_result":  # the call is complete: show it, then continue below it
                    flush()
                    show_tool(ev.tool)
                    text, box = "", st.empty()
            flush()
            for call in reply.tool_calls:  # calls the server did not run itself (no result)
                if call.result is None:
                    show_tool(call)
        except ChatError:
            flush()
            st.error(reply.error)
        except Exception as e:  # never a traceback in the page
            reply.error = f"Unexpected failure: {type(e).__name__}: {e}"
            st.error(reply.error)
        show_footer(reply)
    return reply


def main() -> None:
    st.set_page_config(page_title="berrylm chat", page_icon="🍓")
    init_state()
    settings = sidebar()
    ss = st.session_state
    if settings["clear"]:
        ss.history = []
    regen = settings["regenerate"] and ss.history
    if regen and ss.history[-1]["role"] == "assistant":
        ss.history.pop()
    if not ss.history:
        st.caption(f"Chatting with `{settings['model'] or '?'}` at {ss.base_url}")
    for turn in ss.history:
        with st.chat_message(turn["role"]):
            if turn["role"] == "user":
                st.markdown(turn["content"])
            else:
                show_reply(turn["reply"])
    prompt = st.chat_input("Ask berry…")
    if prompt:
        ss.history.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
    if prompt or (regen and ss.history):
        ss.history.append({"role": "assistant", "reply": stream_answer(settings)})


if __name__ == "__main__":  # `streamlit run` and AppTest run the file as __main__; tests import it
    main()
