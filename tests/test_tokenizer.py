"""Tokenizer: byte-level BPE with the GPT-2 split, special tokens, and the one chat template."""

from __future__ import annotations

import regex

from berrylm.model.tokenizer import SPECIAL_TOKENS, Tokenizer
from berrylm.train.data.tokenizer import train_bpe

# the GPT-2 pre-tokenizer pattern (what llama.cpp's `gpt-2` pre-tokenizer implements)
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

UNICODE_TEXT = ("Héllo wörld — naïve café; 東京は晴れ 🍓🍓 12345 + 6.78 = ?\n\n\tTabs   and  spaces' "
                "they're I'll  don't\r\nΑθήνα Москва عربى 👩‍👩‍👧")

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_0", "type": "function",
                     "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "84"},
    {"role": "assistant", "content": "12 × 7 = 84."},
    {"role": "user", "content": "Thanks! And 84 ÷ 4?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def test_special_tokens_come_first_and_are_atomic(tokenizer):
    assert [tokenizer.tk.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.im_start_id and ids[-1] == tokenizer.im_end_id
    assert tokenizer.eos_ids == [tokenizer.im_end_id, tokenizer.endoftext_id]


def test_round_trip_is_lossless_on_unicode(tokenizer):
    assert tokenizer.decode(tokenizer.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_pre_tokenization_is_exactly_the_gpt2_split(tokenizer):
    pieces = [p for p, _ in tokenizer.tk.pre_tokenizer.pre_tokenize_str(UNICODE_TEXT)]
    byte_level = tokenizer.tk.decoder
    decoded = [byte_level.decode([p]) for p in pieces]
    assert decoded == GPT2_SPLIT.findall(UNICODE_TEXT)
    # and no token ever crosses a split boundary
    for piece in GPT2_SPLIT.findall(UNICODE_TEXT):
        assert tokenizer.decode(tokenizer.encode(piece)) == piece


def test_vocab_size_is_respected_and_training_is_deterministic():
    texts = ["the cat sat on the mat " * 20, "a dog ran in the park " * 20] * 10
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert a.vocab_size <= 300
    assert a.tk.to_str() == b.tk.to_str()


def test_chat_template_renders_chatml_with_tool_calls(tokenizer):
    text = tokenizer.render_chat(CHAT, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ('<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}'
            "</tool_call><|im_end|>\n") in text
    assert "<|im_start|>tool\n<tool_response>84</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nThanks! And 84 ÷ 4?<|im_end|>\n<|im_start|>assistant\n")
    with_tools = tokenizer.render_chat(CHAT[1:2], tools=TOOLS)
    assert with_tools.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_weather"' in with_tools
    # dict arguments (HF style) render the same as the JSON string (OpenAI style)
    as_dict = [dict(CHAT[2], tool_calls=[{"function": {"name": "calculator", "arguments": {"expression": "12*7"}}}])]
    assert tokenizer.render_chat(as_dict) == tokenizer.render_chat(CHAT[2:3])


def test_generation_appends_what_the_template_renders_after_a_call(tokenizer):
    """The one tool-response text (model/toolcall.py) is what the chat template and the Ollama template render."""
    from berrylm.export.ollama import TEMPLATE
    from berrylm.model.toolcall import after_call_text, format_tool_call, tool_turn

    call = format_tool_call("calculator", {"expression": "12*7"})
    text = tokenizer.render_chat(CHAT[1:4], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n" + call + after_call_text("84"))
    assert tool_turn("84") in text
    assert tool_turn("{{ $m.Content }}") in TEMPLATE


def test_transformers_apply_chat_template_gives_our_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf.chat_template = tokenizer.chat_template
    for messages, tools in [(CHAT, None), (CHAT[1:], TOOLS), (CHAT[:2], None)]:
        ours = tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=True)
        theirs = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
        assert list(theirs) == ours
        assert hf.encode(UNICODE_TEXT, add_special_tokens=False) == tokenizer.encode(UNICODE_TEXT)


def test_loaded_tokenizer_equals_saved(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(UNICODE_TEXT) == tokenizer.encode(UNICODE_TEXT)
    assert again.chat_template == tokenizer.chat_template
