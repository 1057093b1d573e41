"""In-process generation for training samples and evals, through the one offline decode loop (model/generate.py):
a text continuation, and a chat turn that runs the built-in calculator when the model calls it (the same token
protocol the server uses: the tool result goes back as a `tool` turn, prefilled in one step)."""

from __future__ import annotations

from berrylm.model.generate import generate
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer


def sample_text(model: Transformer, tok: Tokenizer, prompt: str, max_new: int = 48) -> str:
    ids = tok.encode(prompt)
    out, _ = generate(model, ids, max_new, {tok.endoftext_id})
    return prompt + tok.decode([t for t in out if t != tok.endoftext_id])


def chat_with_tools(model: Transformer, tok: Tokenizer, messages: list[dict], run_tool, max_rounds: int = 3,
                    max_new: int = 160) -> dict:
    """One assistant turn. `run_tool(name, arguments_json) -> str` answers calculator calls.
    Returns {"content": final text, "tool_calls": [(name, arguments_json, result)], "raw": all generated text}."""
    from berrylm.model.toolcall import after_call_text, parse_tool_calls

    ids = tok.encode_chat(messages, add_generation_prompt=True)
    stop = {tok.im_end_id, tok.endoftext_id, tok.tool_call_end_id}
    cache, pending, calls, text_all = None, ids, [], ""
    for _ in range(max_rounds + 1):
        out, cache = generate(model, pending, max_new, stop, cache)
        text = tok.decode([t for t in out if t not in (tok.im_end_id, tok.endoftext_id)], skip_special=False)
        text_all += text
        if not out or out[-1] != tok.tool_call_end_id or len(calls) >= max_rounds:
            content = text.split("<tool_call>")[0]
            return {"content": content.strip(), "tool_calls": calls, "raw": text_all}
        parsed = parse_tool_calls(text)
        call = parsed[-1] if parsed else None
        if call is None or getattr(call, "error", None):
            result = "error: malformed tool call"
            name, args = "?", ""
        else:
            name, args = call.name, call.arguments_json
            result = run_tool(name, args)
        calls.append((name, args, result))
        # the stop token was generated, not yet fed
        pending = [tok.tool_call_end_id] + tok.encode(after_call_text(result))
    return {"content": "", "tool_calls": calls, "raw": text_all}
