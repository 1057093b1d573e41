"""The per-sequence post-step: a sampled token (or a built-in tool's result) -> the `Delta` to report, whether the
sequence is finished and why, and the text of a built-in tool call it just closed.

    post = PostStep(tokenizer, max_model_len)
    r = post.token(seq, sample_out)      # r.delta, r.reason ("stop" / "length" / None), r.call (call text or None)
    r = post.tool_result(seq, event)     # appends the tool turn to seq's tokens; r.reason "length" when no room

Stops: a stop token id, an EOS token (unless ignore_eos), a stop string (the detokenizer), max_tokens, the
context. With built-in tools, the text between `<tool_call>` and `</tool_call>` is not content: it is not
detokenized, and the closing token hands the call text to the engine, which pauses the sequence and runs it.
The engine acts on the result (finish / start the tool) and then reports the delta.
"""

from __future__ import annotations

from dataclasses import dataclass

from berrylm.model.toolcall import after_call_text
from berrylm.serve.detokenizer import Detokenizer
from berrylm.serve.json_guide import JsonGuide
from berrylm.serve.params import SampleOut
from berrylm.serve.sequence import Delta, Sequence, delta_for
from berrylm.serve.tools.builtin import ToolEvent, ToolOptions
from berrylm.serve.tools.openai_tools import MarkerDetokenizer


@dataclass
class StepResult:
    delta: Delta
    reason: str | None = None  # the sequence is finished: "stop" or "length"
    call: str | None = None  # a built-in tool call to run (the text between the call tokens)


class PostStep:
    def __init__(self, tokenizer, max_model_len: int, token_bytes: list[bytes]):
        self.tokenizer, self.max_model_len, self.token_bytes = tokenizer, max_model_len, token_bytes
        self.eos = set(tokenizer.eos_ids)
        self.tool_open, self.tool_close = tokenizer.tool_call_id, tokenizer.tool_call_end_id

    def prepare(self, s: Sequence, tools: ToolOptions | None, guide) -> None:
        """A new sequence's detokenizer and token constraint (guide: an object or a factory; else json_mode's)."""
        p = s.params
        if tools is not None and tools.markers:
            s.detok = MarkerDetokenizer(self.tokenizer, p.stop, {self.tool_open, self.tool_close})
        else:
            s.detok = Detokenizer(self.tokenizer, p.stop, p.skip_special_tokens)
        if hasattr(guide, "make"):  # a grammar (serve/grammar.py: GrammarSpec), built for this engine's tokenizer
            s.guide = guide.make(self.tokenizer, self.token_bytes, p.max_tokens)
        elif guide is not None:
            s.guide = guide() if callable(guide) else guide
        else:
            s.guide = JsonGuide(self.token_bytes, self.tokenizer.eos_ids) if p.json_mode else None

    def token(self, s: Sequence, o: SampleOut) -> StepResult:
        p = s.params
        s.output.append(o.token)
        if s.guide is not None:
            s.guide.advance(o.token)
        builtin = s.tools is not None and s.tools.builtin
        text, reason, call = "", None, None
        if o.token in p.stop_token_ids or (o.token in self.eos and not p.ignore_eos):
            reason = "stop"
            if isinstance(s.detok, MarkerDetokenizer) and o.token in s.detok.keep:
                text = s.detok.add(o.token)  # e.g. parallel_tool_calls=false stops at </tool_call>
        elif builtin and o.token == self.tool_open and s.call_start < 0:
            s.call_start = len(s.output)  # a call's text is not content: it is not detokenized
        elif builtin and s.call_start >= 0:
            if o.token == self.tool_close:
                call = self.tokenizer.decode(s.output[s.call_start:-1])
                s.call_start = -1
        else:
            text = s.detok.add(o.token)
            if s.detok.stopped is not None:
                reason = "stop"
        if reason is None and (s.n_generated >= p.max_tokens or s.length >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += s.detok.flush()
        delta = delta_for(s, text=text, tokens=[o.token], logprobs=[o] if p.logprobs else [], finish_reason=reason)
        return StepResult(delta, reason, call)

    def tool_result(self, s: Sequence, ev: ToolEvent) -> StepResult:
        """Append the tool turn (prefilled in one chunk by the next steps) so that s can decode again."""
        ids = self.tokenizer.encode(after_call_text(ev.output))
        reason = None
        if s.length + len(ids) >= self.max_model_len:
            reason = "length"  # no room left to read the result and answer
        else:
            s.output += ids
            s.n_injected += len(ids)
        delta = delta_for(s, finish_reason=reason, tool_events=[ev])
        if reason is not None:
            delta.text = s.detok.flush()
        return StepResult(delta, reason)
